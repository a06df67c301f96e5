"""Partial fine-tuning, image side: does tuning the last block(s) of EfficientNet-Lite0 together with the
contrastive heads beat heads on frozen features, on Flickr8k val mR?

The shipped `contrastive` recipe trains MLP heads over frozen Lite0 features (pooled 1280 + logits
1000 + the seven stage means, centre view) and MiniLM + LSA text features. Here the network runs once
over the photos and caches the activation that enters block 14 (the last two blocks see 192x7x7 maps)
with the means of stages 1-5; a tail module (blocks 14-15 or block 15 alone, the 1x1 conv head + BN,
the classifier frozen or tuned) then recomputes pooled/logits/stage means from the cache, equal to the
frozen features at initialisation (checked). Stage 1: heads on frozen features to their best val epoch
(or loaded from a checkpoint of the same recipe, seed 0); stage 2: tail + heads a few epochs more at a
small learning rate, val mR after each. Batch norm stays in inference mode (running statistics).
Validation only: the test split is never read.

    PYTHONPATH=src nice -n 10 python -m benchmarks.image_finetune_probe encode
    PYTHONPATH=src nice -n 10 python -m benchmarks.image_finetune_probe tune --blocks 1 --lr 1e-4 \
        --stage1 /tmp/ft/stage1_0.pt
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cbir.datasets import load_dataset
from cbir.encoders import image_features, shared_text_encoder
from cbir.encoders.image import network_input, network_module, preprocess, read_image_file
from cbir.feature_kinds import ALL_COMPUTED
from cbir.metrics import retrieval_metrics
from cbir.models.classical.text_features import TextFeaturizer
from cbir.models.torch_training import CaptionSampler, MLPHead, seed_everything, standardiser

DATA = "/work/shared/datasets/flickr8k"
CUT = 14  # first block of the tunable tail when two blocks are tuned (block 15 alone: one block)
SPLITS = ("train", "val")


def stage_ends(net) -> list[int]:
    """Index of each stage's last block (where `network_module` takes a stage mean)."""
    widths = [b._block_args.output_filters for b in net._blocks]
    return [i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]]


def encode_split(net, paths: list[Path], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(activations entering block CUT, means of the stages that end before it) of each photo."""
    ends = [e for e in stage_ends(net) if e < CUT]
    acts, means = [], []
    for lo in range(0, len(paths), batch):
        pixels = np.stack([preprocess(read_image_file(p), "center") for p in paths[lo : lo + batch]])
        x = torch.from_numpy(network_input(pixels))
        with torch.inference_mode():
            x = net._swish(net._bn0(net._conv_stem(x)))
            stages = []
            for i, block in enumerate(net._blocks[:CUT]):
                x = block(x)
                if i in ends:
                    stages.append(x.mean(dim=(2, 3)))
        acts.append(x.numpy())
        means.append(torch.cat(stages, 1).numpy())
    return np.concatenate(acts), np.concatenate(means)


def encode(out: Path) -> None:
    """Run the frozen network once over train and val; write the cache and report its size and time."""
    net = network_module("lite0").net
    ds = load_dataset(DATA)
    for split in SPLITS:
        t = time.time()
        acts, means = encode_split(net, list(ds.split(split).images))
        np.save(out / f"act{CUT}_{split}.npy", acts)
        np.save(out / f"means{CUT}_{split}.npy", means)
        mb = (acts.nbytes + means.nbytes) / 2**20
        print(
            f"{split}: {len(acts)} photos, {acts.shape[1:]} + {means.shape[1]} means, {mb:.0f} MiB, "
            f"{time.time() - t:.0f} s",
            flush=True,
        )


class Tail(nn.Module):
    """The last `blocks` blocks, conv head + BN and classifier: cached activations -> pooled, logits,
    stage means, as `network_module` lays them out. BN layers always use their running statistics."""

    def __init__(self, net, blocks: int, tune_fc: bool):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks[len(net._blocks) - blocks :])))
        self.frozen = nn.ModuleList(copy.deepcopy(list(net._blocks[CUT : len(net._blocks) - blocks])))
        self.conv_head, self.bn1 = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1)
        self.act, self.fc = copy.deepcopy(net._swish), copy.deepcopy(net._fc)
        self.ends = set(stage_ends(net))
        self.first = len(net._blocks) - blocks
        for p in [*self.frozen.parameters(), *([] if tune_fc else self.fc.parameters())]:
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Tail:
        return super().train(False)  # BN in inference mode: running statistics, never batch ones

    def forward(self, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        stages = [means]
        for i, block in enumerate([*self.frozen, *self.blocks], start=CUT):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first):
                x = block(x)
            if i in self.ends:
                stages.append(x.mean(dim=(2, 3)))
        pooled = self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))
        return torch.cat([pooled, self.fc(pooled), *stages], 1)


def tail_features(tail: Tail, acts: torch.Tensor, means: torch.Tensor, rows=None, grad: bool = False):
    """The tail's features of `rows` (all, in chunks, without gradients, when None)."""
    if rows is not None:
        with torch.set_grad_enabled(grad):
            return tail(acts[rows], means[rows])
    with torch.no_grad():
        return torch.cat([tail(acts[s : s + 500], means[s : s + 500]) for s in range(0, len(acts), 500)])


def text_inputs(tr, va) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM + LSA caption features (frozen), as the shipped recipe and the text-side probe use them."""
    feat = TextFeaturizer(
        "lsa", ngrams=2, stem=False, stop_words=False, max_features=8192, seed=0, lsa_dim=256
    ).fit(tr.captions)
    enc = shared_text_encoder()
    return tuple(
        torch.from_numpy(
            np.concatenate([enc.encode(s.captions, progress=False), feat.transform(s.captions)], 1)
        )
        for s in (tr, va)
    )


class Probe:
    """Heads (and optionally the tail) trained by symmetric InfoNCE, validated on val mR each epoch."""

    def __init__(self, tr, va, img: np.ndarray, txt: torch.Tensor, vtxt: torch.Tensor, seed: int):
        self.tr, self.va, self.txt, self.vtxt = tr, va, txt, vtxt
        self.rng = seed_everything(seed)
        self.ih = MLPHead(img.shape[1], 512, 512, 0.5, 0.7, **standardiser(img))
        self.th = MLPHead(txt.shape[1], 512, 512, 0.5, 0.7, **standardiser(txt.numpy()))
        self.scale = nn.Parameter(torch.tensor(float(np.log(20.0))))
        self.sampler = CaptionSampler(tr.caption_image, 1, 256, self.rng)

    def state(self):
        return copy.deepcopy((self.ih.state_dict(), self.th.state_dict(), None, self.scale.data.clone()))

    def load(self, state) -> None:
        self.ih.load_state_dict(state[0])
        self.th.load_state_dict(state[1])
        self.scale.data = state[3]

    def loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = nn.functional.normalize(self.ih(a), dim=1), nn.functional.normalize(self.th(b), dim=1)
        logits = a @ b.T * self.scale.clamp(max=np.log(100.0)).exp()
        target = torch.arange(len(a))
        ce = nn.functional.cross_entropy
        return (ce(logits, target) + ce(logits.T, target)) / 2

    def val_mr(self, vimg: torch.Tensor) -> dict:
        self.ih.eval()
        self.th.eval()
        with torch.no_grad():
            a = nn.functional.normalize(self.ih(vimg), dim=1)
            b = nn.functional.normalize(self.th(self.vtxt), dim=1)
        return retrieval_metrics((b @ a.T).numpy(), self.va.caption_image)

    def run(self, epochs: int, head_lr: float, patience: int, images, val_images, tail=None, tail_lr=0.0):
        """Train `epochs` (cosine schedule), keep the best val epoch; `images(rows, grad)` gives the
        image features of training rows, `val_images()` those of val."""
        groups = [{"params": [*self.ih.parameters(), *self.th.parameters(), self.scale], "lr": head_lr}]
        if tail is not None:
            groups.append({"params": [p for p in tail.parameters() if p.requires_grad], "lr": tail_lr})
        opt = torch.optim.AdamW(groups, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        best, best_epoch, state, stale = -1.0, 0, None, 0
        for epoch in range(1, epochs + 1):
            t = time.time()
            self.ih.train()
            self.th.train()
            for im, cap, _ in self.sampler():
                opt.zero_grad()
                loss = self.loss(images(im, True), self.txt[cap])
                loss.backward()
                opt.step()
            sched.step()
            r = self.val_mr(val_images())
            print(
                f"  ep {epoch} loss {loss.item():.3f} val mR {r['mR']:.2f} t2i R1 {r['t2i_r1']:.1f} "
                f"R10 {r['t2i_r10']:.1f} i2t R1 {r['i2t_r1']:.1f} ({time.time() - t:.0f} s)",
                flush=True,
            )
            if r["mR"] > best:
                best, best_epoch, state, stale = r["mR"], epoch, self.state(), 0
            else:
                stale += 1
            if stale >= patience:
                break
        return best, best_epoch, state


def tune(args, cache: Path) -> None:
    """Stage 1 (loaded or trained), then stage 2 with the tail tuned."""
    torch.set_num_threads(args.threads)
    ds = load_dataset(DATA)
    tr, va = ds.split("train"), ds.split("val")
    img = image_features(tr, ALL_COMPUTED, "center", progress=False, backbone="lite0")
    vimg = torch.from_numpy(image_features(va, ALL_COMPUTED, "center", progress=False, backbone="lite0"))
    acts, means = (torch.from_numpy(np.load(cache / f"{k}{CUT}_train.npy")) for k in ("act", "means"))
    vacts, vmeans = (torch.from_numpy(np.load(cache / f"{k}{CUT}_val.npy")) for k in ("act", "means"))
    tail = Tail(network_module("lite0").net, args.blocks, args.tune_fc)
    for name, (a, m, ref) in {"train": (acts, means, img), "val": (vacts, vmeans, vimg)}.items():
        diff = (tail_features(tail, a, m) - torch.as_tensor(ref)).abs().max()
        print(f"tail at init vs cached frozen features ({name}): max abs diff {float(diff):.2e}", flush=True)
    txt, vtxt = text_inputs(tr, va)
    probe = Probe(tr, va, img, txt, vtxt, args.seed)
    img = torch.from_numpy(img)
    if args.stage1 and Path(args.stage1).exists():
        best, best_epoch, state = torch.load(args.stage1, weights_only=False)
        print(f"stage 1 loaded from {args.stage1}: its val mR {best:.2f} (epoch {best_epoch})")
    else:
        best, best_epoch, state = probe.run(30, 1e-3, 8, lambda rows, _: img[rows], lambda: vimg)
        print(f"stage 1 trained: val mR {best:.2f} (epoch {best_epoch})")
    probe.load(state)
    print(f"STAGE1 val mR here {probe.val_mr(vimg)['mR']:.2f}", flush=True)
    if not args.epochs:
        return
    t = time.time()
    if args.lr:
        best2, epoch2, _ = probe.run(
            args.epochs,
            args.head_lr,
            99,
            lambda rows, grad: tail_features(tail, acts, means, rows, grad),
            lambda: tail_features(tail, vacts, vmeans),
            tail,
            args.lr,
        )
    else:  # the control: the heads alone go on at the stage-2 learning rate, on frozen features
        best2, epoch2, _ = probe.run(args.epochs, args.head_lr, 99, lambda rows, _: img[rows], lambda: vimg)
    print(
        f"STAGE2 blocks {args.blocks} fc {'tuned' if args.tune_fc else 'frozen'} lr {args.lr:g} "
        f"head lr {args.head_lr:g}: best val mR {best2:.2f} (epoch {epoch2}), {time.time() - t:.0f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["encode", "tune"])
    ap.add_argument("--cache", default="/tmp/imgft")
    ap.add_argument("--blocks", type=int, default=1, choices=[1, 2])
    ap.add_argument("--tune-fc", action="store_true", help="tune the ImageNet classifier too")
    ap.add_argument("--lr", type=float, default=1e-4, help="tuned blocks' learning rate (0: heads alone)")
    ap.add_argument("--head-lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=3, help="stage 2 epochs (0: stage 1 only)")
    ap.add_argument("--stage1", default="", help="stage-1 checkpoint (best, epoch, state); trained if absent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.what == "encode":
        torch.set_num_threads(args.threads)
        encode(cache)
    else:
        tune(args, cache)


if __name__ == "__main__":
    main()
