"""Training pieces the deep methods share: the projection head, seeding, and an epoch loop with
early stopping on a validation score and a progress bar. Imported only inside `fit` (it needs torch);
the fitted heads run in NumPy (`cbir.models.heads`)."""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cbir.progress import progress_bar


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and Python, and return the NumPy generator the method should draw from."""
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class MLPHead(nn.Module):
    """Standardise the input, then a linear map plus (when `hidden` > 0) a residual ReLU layer.

    The linear path alone is a strong start on small data; the hidden layer adds what it can.
    Mirrored in NumPy by `cbir.models.heads.head_forward`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 0,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ):
        super().__init__()
        if mean is not None:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        else:
            self.mean = None
        self.input_dropout = nn.Dropout(input_dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        if hidden:
            self.hidden = nn.Linear(in_dim, hidden)
            self.dropout = nn.Dropout(dropout)
            self.out = nn.Linear(hidden, out_dim)
        else:
            self.hidden = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.scale
        x = self.input_dropout(x)
        y = self.linear(x)
        if self.hidden is not None:
            y = y + self.out(self.dropout(torch.relu(self.hidden(x))))
        return y


class CaptionSampler:
    """Batches of distinct images, each with one of its captions and one of its cached views.

    An epoch shows every caption once on average; distinct images per batch keep InfoNCE free of
    false negatives from the same photo.
    """

    def __init__(self, caption_image: np.ndarray, n_views: int, batch_size: int, rng: np.random.Generator):
        self.order = np.argsort(caption_image, kind="stable")
        self.count = np.bincount(caption_image, minlength=caption_image.max() + 1)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.images = np.flatnonzero(self.count)
        self.rounds = max(1, round(len(caption_image) / len(self.images)))
        self.n_views, self.batch_size, self.rng = n_views, min(batch_size, len(self.images)), rng

    def __call__(self):
        for _ in range(self.rounds):
            perm = self.rng.permutation(self.images)
            for lo in range(0, len(perm) - self.batch_size // 2, self.batch_size):
                img = perm[lo : lo + self.batch_size]
                cap = self.order[self.start[img] + (self.rng.random(len(img)) * self.count[img]).astype(int)]
                yield img, cap, self.rng.integers(self.n_views, size=len(img))


def standardiser(x: np.ndarray) -> dict[str, np.ndarray]:
    """`mean` and `scale` keyword arguments for an `MLPHead` over training inputs `x`; the scale has a
    floor so that a feature (nearly) constant in training cannot blow up on new data."""
    std = x.std(0)
    return {"mean": x.mean(0), "scale": np.maximum(std, 0.1 * std.mean() + 1e-6)}


def arrays_of(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The module's weights as NumPy arrays named `prefix.<state_dict key>`."""
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


@dataclass
class TrainingResult:
    epochs_run: int
    best_epoch: int
    best_score: float
    final_loss: float


def train_epochs(
    module: nn.Module,
    batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
    loss_fn: Callable[..., torch.Tensor],
    epochs: int,
    validate: Callable[[], float] | None = None,
    patience: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    description: str = "training",
    group_lr: dict[str, float] | None = None,
    threads: int | None = None,
) -> TrainingResult:
    """AdamW over `module` for up to `epochs` (at `lr`; the children named in `group_lr` at theirs);
    after each epoch `validate()` (higher is better) picks the weights to keep, and `patience` epochs
    without improvement stop early. `threads`: torch's threads meanwhile (default: one)."""
    before = torch.get_num_threads()
    # The heads are small: one thread beats several, which mostly wait on each other (and on the
    # other processes sharing the cores). CBIR_TORCH_THREADS overrides, `threads` included.
    torch.set_num_threads(int(os.environ.get("CBIR_TORCH_THREADS", threads or 1)))
    try:
        optimiser = torch.optim.AdamW(_param_groups(module, group_lr or {}), lr=lr, weight_decay=weight_decay)
        return _train_epochs(module, batches, loss_fn, epochs, validate, patience, optimiser, description)
    finally:
        torch.set_num_threads(before)


def _param_groups(module: nn.Module, group_lr: dict[str, float]) -> list[dict]:
    children = dict(module.named_children())
    special = {id(q) for name in group_lr for q in children[name].parameters()}
    groups = [{"params": [q for q in module.parameters() if id(q) not in special]}]
    return groups + [{"params": list(children[name].parameters()), "lr": lr} for name, lr in group_lr.items()]


def _train_epochs(module, batches, loss_fn, epochs, validate, patience, optimiser, description):
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(epochs, 1))
    best_state, best_score, best_epoch, stale, loss_value = None, -np.inf, 0, 0, float("nan")
    epoch = 0
    with progress_bar(description, epochs) as advance:
        for epoch in range(1, epochs + 1):
            module.train()
            total, count = 0.0, 0
            for batch in batches():
                optimiser.zero_grad()
                loss = loss_fn(*batch)
                loss.backward()
                optimiser.step()
                total, count = total + loss.item(), count + 1
            schedule.step()
            loss_value = total / max(count, 1)
            module.eval()
            if validate is None:
                advance(1, loss=loss_value)
                continue
            with torch.no_grad():
                score = float(validate())
            if score > best_score:
                best_state, best_score, best_epoch, stale = (
                    copy.deepcopy(module.state_dict()),
                    score,
                    epoch,
                    0,
                )
            else:
                stale += 1
            advance(1, loss=loss_value, val=score, best=best_score)
            if stale >= patience:
                break
    module.eval()
    if best_state is not None:
        module.load_state_dict(best_state)
    return TrainingResult(epoch, best_epoch or epoch, float(best_score), loss_value)
