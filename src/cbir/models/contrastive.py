"""`contrastive`: a dual encoder on frozen pretrained features, trained with symmetric InfoNCE.

Images enter as EfficientNet-Lite features (`image_backbone`: Lite0 by default, or the larger Lite2;
or the dataset's own precomputed features), captions as
MiniLM sentence embeddings plus, optionally, LSA vectors of the caption words fitted on the training
captions; only the two projection heads and the temperature are learned. On a few thousand images the
frozen features carry the knowledge and the heads only align them, so what matters is rich inputs
(pooled features, logits and per-stage means; sentence and word-level text), using every caption,
cheap augmentation (cached rotated/flipped views of each training image, and the same views averaged
at embedding time), early stopping on the validation split, and averaging several heads (an ensemble).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import (
    VIEWS,
    computed_views,
    encoder_views,
    image_features,
    resolve_image_representation,
)
from cbir.feature_kinds import ALL_COMPUTED, COMPUTED_KINDS, DEFAULT_BACKBONE, EFFNET_LOGITS
from cbir.metrics import mr_standard_error, retrieval_metrics
from cbir.models.base import (
    SHARED_PARAMS,
    ModelError,
    Param,
    RetrievalModel,
    grid_search,
    has_scored_val,
    require_training_pairs,
    unit_rows,
)
from cbir.models.classical.text_features import TEXT_KINDS, TextFeaturizer, parse_kinds
from cbir.models.heads import head_forward

BANK_TEMPERATURES = (0.01, 0.02, 0.05)
# Weights of the zero-shot (ConSE) score tried on val when `zero_shot_weight` is left to the method.
ZERO_SHOT_MEANING = "share of the zero-shot (ConSE) score mixed in (null: chosen on val)"
ZERO_SHOT_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# `image_features="auto"` without precomputed features: every EfficientNet output, which together beat
# the pooled features alone on RSICD (BENCHMARKS.md, deep methods).
COMPUTED_FEATURES = ALL_COMPUTED
# How weights are stored on disk; the model always computes in float32. float16 halves a model, int8
# (matrices quantised row by row, vectors in float16) quarters it: the shipped default's size limit.
WEIGHT_DTYPES = ("float32", "float16", "int8")
QUANT_SCALE = ".qscale"


def stored_arrays(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Float arrays as `dtype` for saving; int8 keeps one float32 scale per matrix row (`.qscale`)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if value.dtype.kind != "f" or dtype == "float32":
            out[name] = value
        elif dtype == "int8" and value.ndim == 2:
            scale = np.maximum(np.abs(value).max(1, keepdims=True), 1e-12).astype(np.float32) / 127
            out[name] = np.round(value / scale).astype(np.int8)
            out[name + QUANT_SCALE] = scale
        else:
            out[name] = value.astype(np.float16)
    return out


def loaded_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`stored_arrays` undone: every float array back in float32, in one pass over each (int8 times its
    float32 scale is float32; a float32 array is kept, not copied): ~40 ms less of a cold search."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.endswith(QUANT_SCALE):
            continue
        if name + QUANT_SCALE in arrays:
            value = value * arrays[name + QUANT_SCALE]
        out[name] = value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value
    return out


@dataclass
class TextStage:
    """The heads as trained on frozen caption features, and what trained them: where tuning MiniLM's
    last layers starts (`ContrastiveModel._tune_text`)."""

    module: Any  # torch ModuleDict: image and text heads, log_scale
    loss_fn: Callable
    validate: Callable | None
    sampler: Callable
    images: Any  # (views, images, features) tensor
    best_score: float


class ContrastiveModel(RetrievalModel):
    """Dual encoder: MLP heads over frozen image and caption features (MiniLM + LSA), symmetric InfoNCE."""

    method = "contrastive"
    PARAMS = {
        "image_features": SHARED_PARAMS["image_features"],
        "image_backbone": SHARED_PARAMS["image_backbone"],
        "text_features": SHARED_PARAMS["text_features"],
        "lsa_dim": Param("dimensions of the LSA caption features", int, 1),
        "views": Param(f"image views trained on ({', '.join(VIEWS)})", list),
        "embed_views": Param("image views averaged when embedding", list),
        "use_augmented": SHARED_PARAMS["use_augmented"],
        "embed_dim": Param("dimensions of the shared space", int, 1),
        "hidden": Param("hidden units of each head's residual layer (0: linear heads)", int, 0),
        "dropout": Param("dropout in the heads", float, 0, 1, open_high=True),
        "input_dropout": Param("dropout on the input features", float, 0, 1, open_high=True),
        "temperature": Param("initial InfoNCE temperature (then learned)", float, 0, open_low=True),
        **{k: SHARED_PARAMS[k] for k in ("batch_size", "lr")},
        "weight_decay": Param("AdamW weight decay", float, 0),
        **{k: SHARED_PARAMS[k] for k in ("epochs", "patience")},
        "ensemble": Param("heads trained with different seeds and averaged", int, 1),
        "bank_size": Param("captions and images kept to normalise query scores (0: none)", int, 0),
        "seed": SHARED_PARAMS["seed"],
        "weights_dtype": Param("how saved weights are stored (computed in float32)", choices=WEIGHT_DTYPES),
        "zero_shot_weight": Param(ZERO_SHOT_MEANING, float, 0, 1, open_high=True, optional=True),
        "text_tune_layers": Param(
            "MiniLM's last layers tuned with the first heads once they converge (0: none); the other "
            "ensemble members train on the tuned features",
            int,
            0,
            6,
        ),
        "text_tune_epochs": Param("epochs of that tuning (the best on val is kept)", int, 1),
        "text_tune_lr": Param(
            "learning rate of the tuned layers (the heads' is lr / 10 then)", float, 0, open_low=True
        ),
    }

    def __init__(
        self,
        image_features: str = "auto",
        image_backbone: str = DEFAULT_BACKBONE,
        text_features: str = "minilm+lsa",
        lsa_dim: int = 256,
        views: Sequence[str] = ("center",),
        embed_views: Sequence[str] = ("center",),
        use_augmented: bool = True,
        embed_dim: int = 512,
        hidden: int = 512,
        dropout: float = 0.5,
        input_dropout: float = 0.7,
        temperature: float = 0.05,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        epochs: int = 20,
        patience: int = 4,
        ensemble: int = 2,
        bank_size: int = 2048,
        weights_dtype: str = "float32",
        zero_shot_weight: float | None = 0.0,
        text_tune_layers: int = 0,
        text_tune_epochs: int = 3,
        text_tune_lr: float = 5e-5,
        seed: int = 0,
    ):
        unknown = sorted((set(views) | set(embed_views)) - set(VIEWS))
        if unknown:
            raise ModelError(f"unknown view(s) {', '.join(unknown)} (known: {', '.join(VIEWS)})")
        if not views or not embed_views:
            raise ModelError("'views' and 'embed_views' each need at least one view (e.g. center)")
        try:
            kinds = parse_kinds(text_features, TEXT_KINDS, "text representation")
        except ValueError as e:
            raise ModelError(str(e)) from None
        if text_tune_layers and "minilm" not in kinds:
            raise ModelError("text_tune_layers needs minilm among the text_features")
        super().__init__(
            image_features=image_features,
            image_backbone=image_backbone,
            text_features=text_features,
            lsa_dim=lsa_dim,
            views=list(views),
            embed_views=list(embed_views),
            use_augmented=use_augmented,
            embed_dim=embed_dim,
            hidden=hidden,
            dropout=dropout,
            input_dropout=input_dropout,
            temperature=temperature,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            epochs=epochs,
            patience=patience,
            ensemble=ensemble,
            bank_size=bank_size,
            weights_dtype=weights_dtype,
            zero_shot_weight=zero_shot_weight,
            text_tune_layers=text_tune_layers,
            text_tune_epochs=text_tune_epochs,
            text_tune_lr=text_tune_lr,
            seed=seed,
        )

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        import torch

        from cbir.models.torch_training import (
            CaptionSampler,
            MLPHead,
            arrays_of,
            seed_everything,
            standardiser,
            train_epochs,
        )

        require_training_pairs(self.method, train)
        p = self.params
        self.representation_ = resolve_image_representation(p["image_features"], train, COMPUTED_FEATURES)
        self._check_backbone_used()
        views = self._views("views")
        keep = np.flatnonzero(train.caption_image >= 0)
        if not p["use_augmented"] and train.augmented is not None:
            keep = keep[~train.augmented[keep]]
        if len(keep) == 0:
            raise ModelError("the train split has no captions paired with images")
        caption_image = train.caption_image[keep]
        train_captions = [train.captions[j] for j in keep]
        self.text_ = self._text_featurizer().fit(train_captions)
        texts = torch.from_numpy(self.text_.transform(train_captions))
        images = torch.from_numpy(np.stack([self._image_features(train, v) for v in views]))
        center = images[0].numpy()
        has_val = has_scored_val(val)
        if has_val:
            val_images = torch.from_numpy(self._image_features(val))
            val_texts = torch.from_numpy(self.text_.transform(val.captions))

        self.arrays_: dict[str, np.ndarray] = {}
        self.history_: list[dict[str, float]] = []
        for member in range(p["ensemble"]):
            rng = seed_everything(p["seed"] + member)
            image_head = MLPHead(
                images.shape[2], p["embed_dim"], p["hidden"], p["dropout"], p["input_dropout"],
                **standardiser(center),
            )  # fmt: skip
            text_head = MLPHead(
                texts.shape[1], p["embed_dim"], p["hidden"], p["dropout"], p["input_dropout"],
                **standardiser(texts.numpy()),
            )  # fmt: skip
            log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1.0 / p["temperature"]))))
            module = torch.nn.ModuleDict({"image": image_head, "text": text_head})
            module.register_parameter("log_scale", log_scale)
            sampler = CaptionSampler(caption_image, len(views), p["batch_size"], rng)

            def batches(sampler=sampler, texts=texts):
                for img, cap, view in sampler():
                    yield images[view, img], texts[cap]

            def loss_fn(x_img, x_txt, image_head=image_head, text_head=text_head, log_scale=log_scale):
                a = torch.nn.functional.normalize(image_head(x_img), dim=1)
                b = torch.nn.functional.normalize(text_head(x_txt), dim=1)
                logits = a @ b.T * log_scale.clamp(max=np.log(100.0)).exp()
                target = torch.arange(len(a))
                ce = torch.nn.functional.cross_entropy
                return (ce(logits, target) + ce(logits.T, target)) / 2

            validate = None
            if has_val:

                def validate(image_head=image_head, text_head=text_head, val_texts=val_texts):
                    a = torch.nn.functional.normalize(image_head(val_images), dim=1)
                    b = torch.nn.functional.normalize(text_head(val_texts), dim=1)
                    return retrieval_metrics((b @ a.T).numpy(), val.caption_image)["mR"]

            result = train_epochs(
                module,
                batches,
                loss_fn,
                epochs=p["epochs"],
                validate=validate,
                patience=p["patience"],
                lr=p["lr"],
                weight_decay=p["weight_decay"],
                description=f"contrastive {member + 1}/{p['ensemble']}",
            )
            record = {
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "val_mR": result.best_score,
                "loss": result.final_loss,
            }
            if p["text_tune_layers"] and member == 0:  # later members train on the tuned features
                stage = TextStage(module, loss_fn, validate, sampler, images, result.best_score)
                tuned = self._tune_text(stage, train_captions, texts, val, val_texts if has_val else None)
                texts, val_texts, record["text_tuning"] = tuned
            self.history_.append({**record, "temperature": float(torch.exp(-log_scale.detach()))})
            self.arrays_.update(arrays_of(image_head, f"m{member}.image"))
            self.arrays_.update(arrays_of(text_head, f"m{member}.text"))
        self.bank_temperature_ = 0.0
        if p["bank_size"]:
            rng = np.random.default_rng(p["seed"])
            bank_texts = texts.numpy()[rng.choice(len(texts), min(p["bank_size"], len(texts)), replace=False)]
            bank_images = center[rng.choice(len(center), min(p["bank_size"], len(center)), replace=False)]
            self.arrays_["bank.text"] = self._embed(bank_texts, "text").astype(np.float16)
            self.arrays_["bank.image"] = self._embed(bank_images, "image").astype(np.float16)
            if has_val:
                self.bank_temperature_ = self._choose_bank_temperature(
                    val_texts.numpy(), val_images.numpy(), val
                )
        self._fit_zero_shot(val if has_val else None)
        return self

    def _tune_text(self, stage: TextStage, captions: list[str], texts, val: Dataset | None, val_texts):
        """Tune MiniLM's last layers with the converged heads (`text_tuning`); keep them only where val
        mR improves. Returns the train and val caption features as they now are, and a record."""
        import torch

        from cbir.models.text_tuning import CaptionTuner
        from cbir.models.torch_training import train_epochs

        p = self.params
        columns = self.text_.block_columns("minilm")
        tuner = CaptionTuner(self.text_.minilm_encoder(), p["text_tune_layers"], columns)
        states = tuner.states(captions)
        val_states = tuner.states(val.captions) if stage.validate is not None else None
        before = copy.deepcopy(stage.module.state_dict())
        stage.module["minilm"] = tuner.top

        def batches():
            for img, cap, view in stage.sampler():
                yield stage.images[view, img], cap

        def validate():
            return stage.validate(val_texts=tuner.all_features(val_texts, val_states))

        result = train_epochs(
            stage.module,
            batches,
            lambda x_img, cap: stage.loss_fn(x_img, tuner.features(texts, states, cap)),
            epochs=p["text_tune_epochs"],
            validate=validate if stage.validate is not None else None,
            patience=p["text_tune_epochs"],
            lr=p["lr"] / 10,
            weight_decay=p["weight_decay"],
            description=f"tuning MiniLM's last {p['text_tune_layers']} layer(s)",
            group_lr={"minilm": p["text_tune_lr"]},
            # A transformer layer keeps every core busy, unlike the heads: torch's own count (the cores
            # this process may use, OMP_NUM_THREADS), not os.cpu_count() (every core of the host).
            threads=torch.get_num_threads(),
        )
        del stage.module["minilm"]
        record = {
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "val_mR": result.best_score,
        }
        if stage.validate is not None and result.best_score <= stage.best_score:
            stage.module.load_state_dict(before)  # tuning did not pay on val: the frozen model stays
            return texts, val_texts, {**record, "kept": False}
        self.text_.tune_minilm(tuner.weights())
        tuned_val = tuner.all_features(val_texts, val_states) if val_texts is not None else None
        return tuner.all_features(texts, states), tuned_val, {**record, "kept": True}

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        """`views` of the training images; of val, the centre view (early stopping, the bank and the
        zero-shot weight, whose logits are computed even beside CLIP features) and `embed_views`
        (calibration). Precomputed features: none."""
        p = self.params
        representation = resolve_image_representation(p["image_features"], train, COMPUTED_FEATURES)
        if representation.startswith("resnet"):
            return []
        needs = [(train, computed_views(representation, p["views"]))]
        if has_scored_val(val):
            views = computed_views(representation, list(dict.fromkeys(["center", *p["embed_views"]])))
            zero_shot = p["zero_shot_weight"] != 0.0 and "center" not in views
            needs.append((val, views + ["center"] * zero_shot))
        return needs

    def _check_backbone_used(self) -> None:
        """A backbone other than the default needs an effnet-* representation to compute."""
        backbone = self.params["image_backbone"]
        if backbone != DEFAULT_BACKBONE and not any(
            k in COMPUTED_KINDS for k in self.representation_.split("+")
        ):
            raise ModelError(
                f"image_backbone={backbone} computes effnet-* features, but the image features here are "
                f"{self.representation_}; use image_features=effnet-pool (or another effnet-* kind)"
            )

    def image_backbone(self) -> str:
        return self.params["image_backbone"]

    def _image_features(self, images: Dataset, view: str = "center", kind: str | None = None) -> np.ndarray:
        """The images' features of `kind` (the model's representation) from the model's backbone."""
        return image_features(images, kind or self.representation_, view, backbone=self.image_backbone())

    def _views(self, which: str) -> list[str]:
        """The `views` or `embed_views` parameter; precomputed (ResNet) features have only one view."""
        return ["center"] if self.representation_.startswith("resnet") else self.params[which]

    def _text_featurizer(self) -> TextFeaturizer:
        """Caption features: word n-grams as written (no stemming, stop words kept: in captions like
        "two white storage tanks" the counts and small words carry meaning)."""
        p = self.params
        return TextFeaturizer(
            p["text_features"], ngrams=2, stem=False, stop_words=False, max_features=8192,
            seed=p["seed"], lsa_dim=p["lsa_dim"],
        )  # fmt: skip

    def _choose_bank_temperature(self, val_texts: np.ndarray, val_images: np.ndarray, val: Dataset) -> float:
        """The bank temperature (0 = no normalisation) with the best validation mR."""
        text_emb, image_emb = self._embed(val_texts, "text"), self._embed(val_images, "image")

        def val_mr(temperature: float) -> float:
            self.bank_temperature_ = temperature
            t, i = self._with_bank(text_emb, image_emb)
            return retrieval_metrics(t @ i.T, val.caption_image)["mR"]

        best, _ = grid_search([0.0, *BANK_TEMPERATURES], val_mr, "bank temperature", progress=False)
        return best

    def _with_bank(self, texts: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverted softmax against a bank of training captions and images (hubness reduction).

        An image close to many captions (a hub) is ranked down by T log sum_bank exp(s / T) over the
        training captions, and a caption close to many images likewise; both offsets fold into two extra
        coordinates, so the result is still an inner product over fixed embeddings: no query batch needed.
        """
        temperature = self.bank_temperature_
        if not temperature:
            return texts, images

        def offset(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
            z = x @ bank.astype(np.float32, copy=False).T / temperature  # a loaded bank is float32: no copy
            top = z.max(1, keepdims=True)
            return temperature * (top + np.log(np.exp(z - top).mean(1, keepdims=True)))

        t_off, i_off = offset(texts, self.arrays_["bank.image"]), offset(images, self.arrays_["bank.text"])
        return (
            np.concatenate([texts, -np.ones_like(t_off), -t_off], 1),
            np.concatenate([images, i_off, np.ones_like(i_off)], 1),
        )

    def _fit_zero_shot(self, val: Dataset | None) -> None:
        """Set up the zero-shot part and its weight: given, or chosen on val among ZERO_SHOT_WEIGHTS.

        Fusion needs EfficientNet logits, so precomputed (ResNet) features leave it out."""
        from cbir.models.zeroshot import ZeroShotModel

        weight = self.params["zero_shot_weight"]
        self.zero_shot_weight_, self.zero_shot_sweep_ = weight or 0.0, {}
        if weight == 0.0 or (weight is None and val is None):
            return
        if self.representation_.startswith("resnet"):
            if weight is not None:
                raise ModelError("zero_shot_weight needs photos (EfficientNet logits), not precomputed ones")
            return
        self.arrays_["zero_shot.class_embeddings"] = ZeroShotModel(visual_weight=0.0).fit().class_embeddings_
        if weight is None:
            self.zero_shot_weight_ = self._choose_zero_shot_weight(val)

    def _choose_zero_shot_weight(self, val: Dataset) -> float:
        """The largest weight whose val mR is within one standard error of the best (the one-standard-
        error rule): val cannot show the words the zero-shot part is there for, so the choice leans to
        it as far as val cannot tell the difference."""
        own = self._own_texts(val.captions) @ self._own_images(val).T
        zero_shot = self._zero_shot_texts(val.captions) @ self._zero_shot_images(val).T

        def val_mr(w: float) -> float:
            return retrieval_metrics((1 - w) * own + w * zero_shot, val.caption_image)["mR"]

        best, scores = grid_search(ZERO_SHOT_WEIGHTS, val_mr, "zero-shot weight", progress=False)
        error = mr_standard_error((1 - best) * own + best * zero_shot, val.caption_image)
        val_mrs = dict(zip(ZERO_SHOT_WEIGHTS, scores, strict=True))
        self.zero_shot_sweep_ = {**{str(w): mr for w, mr in val_mrs.items()}, "standard_error": error}
        return float(max(w for w, mr in val_mrs.items() if mr >= max(scores) - error))

    def _zero_shot(self):
        """The ConSE model over the stored class embeddings (text vectors only: no visual part)."""
        from cbir.models.zeroshot import ZeroShotModel

        zero_shot = ZeroShotModel(visual_weight=0.0)
        zero_shot.class_embeddings_ = self.arrays_["zero_shot.class_embeddings"]
        return zero_shot

    def _zero_shot_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._zero_shot().embed_texts(texts)

    def _zero_shot_images(self, images: Dataset) -> np.ndarray:
        """ConSE vectors of the centre view (what the zero-shot model itself indexes)."""
        return self._zero_shot().concept_embeddings(self._image_features(images, kind=EFFNET_LOGITS))

    def _fused(self, own: np.ndarray, zero_shot: np.ndarray) -> np.ndarray:
        """Own and zero-shot embeddings side by side, weighted so the inner product mixes the scores."""
        w = self.zero_shot_weight_
        return np.concatenate([np.sqrt(1 - w) * own, np.sqrt(w) * zero_shot], 1).astype(np.float32)

    def _embed(self, x: np.ndarray, side: str) -> np.ndarray:
        """Ensemble members' unit embeddings side by side, scaled so the inner product is their mean."""
        k = self.params["ensemble"]
        parts = [unit_rows(head_forward(self.arrays_, f"m{m}.{side}", x)) for m in range(k)]
        return np.concatenate(parts, 1) / np.sqrt(k)

    def _own_texts(self, texts: Sequence[str]) -> np.ndarray:
        emb = self._embed(self.text_.transform(texts), "text")
        return self._with_bank(emb, np.zeros((0, emb.shape[1]), np.float32))[0]

    def image_views(self) -> list[str]:
        """`embed_views`, and the centre view that the zero-shot part reads when it is mixed in."""
        views = encoder_views(self.representation_, self._views("embed_views"))
        return views + ["center"] if self.zero_shot_weight_ and "center" not in views else views

    def _own_images(self, images: Dataset) -> np.ndarray:
        """The mean embedding over `embed_views` (test-time augmentation; one view by default)."""
        views = self._views("embed_views")
        emb = sum(self._embed(self._image_features(images, v), "image") for v in views)
        return self._with_bank(np.zeros((0, emb.shape[1]), np.float32), emb / len(views))[1]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        own = self._own_texts(texts)
        return self._fused(own, self._zero_shot_texts(texts)) if self.zero_shot_weight_ else own

    def embed_images(self, images: Dataset) -> np.ndarray:
        own = self._own_images(images)
        return self._fused(own, self._zero_shot_images(images)) if self.zero_shot_weight_ else own

    def _arrays(self) -> dict[str, np.ndarray]:
        return stored_arrays({**self.arrays_, **self.text_.arrays()}, self.params["weights_dtype"])

    def _state(self) -> dict[str, Any]:
        return {
            "representation": self.representation_,
            "text": self.text_.state(),
            "history": self.history_,
            "bank_temperature": self.bank_temperature_,
            "zero_shot_weight": self.zero_shot_weight_,
            "zero_shot_sweep": self.zero_shot_sweep_,
        }

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        arrays = loaded_arrays(arrays)
        self.arrays_ = arrays
        self.representation_, self.history_ = state["representation"], state["history"]
        self.bank_temperature_ = state["bank_temperature"]
        self.zero_shot_weight_ = state.get("zero_shot_weight", 0.0)  # older models: no fusion
        self.zero_shot_sweep_ = state.get("zero_shot_sweep", {})
        if "text" not in state:  # saved before caption features were a parameter: MiniLM only
            self.params["text_features"] = "minilm"
        self.text_ = self._text_featurizer()
        if "text" in state:
            self.text_.restore(arrays, state["text"])
