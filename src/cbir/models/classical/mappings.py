"""Mappings between a source feature space and a target one, fitted on paired rows.

Each mapping embeds source rows (`embed_source`) and target rows (`embed_target`) into one space
where they are compared: regressions predict the target from the source (the target stays as is);
shared-space methods (CCA, PLS) project both sides.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import scipy.linalg

from cbir.models.base import unit_rows


class Mapping(Protocol):
    def embed_source(self, x: np.ndarray) -> np.ndarray: ...
    def embed_target(self, y: np.ndarray) -> np.ndarray: ...
    def arrays(self) -> dict[str, np.ndarray]: ...
    def state(self) -> dict[str, Any]: ...


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """W minimising |xW - y|^2 + alpha |W|^2 (x and y centred by the caller)."""
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += alpha
    return np.linalg.solve(gram, x.T @ y).astype(np.float32)


class RidgeMap:
    """Linear ridge regression source -> target, with intercept."""

    def __init__(self, source_mean: np.ndarray, target_mean: np.ndarray, weights: np.ndarray):
        self.source_mean, self.target_mean, self.weights = source_mean, target_mean, weights

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float) -> RidgeMap:
        mx, my = x.mean(0), y.mean(0)
        return cls(mx, my, ridge_solve(x - mx, y - my, alpha))

    def embed_source(self, x: np.ndarray) -> np.ndarray:
        return (x - self.source_mean) @ self.weights + self.target_mean

    def embed_target(self, y: np.ndarray) -> np.ndarray:
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        return {"source_mean": self.source_mean, "target_mean": self.target_mean, "weights": self.weights}

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def restore(cls, a: dict[str, np.ndarray], state: dict[str, Any]) -> RidgeMap:
        return cls(a["source_mean"], a["target_mean"], a["weights"])


def kernel(x: np.ndarray, support: np.ndarray, name: str, gamma: float, degree: int) -> np.ndarray:
    """k(x, support) for unit-length rows: RBF exp(-gamma |a-b|^2) or polynomial (gamma a.b + 1)^degree."""
    dots = x @ support.T
    if name == "rbf":
        return np.exp(-gamma * np.maximum(2.0 - 2.0 * dots, 0.0)).astype(np.float32)
    return ((gamma * dots + 1.0) ** degree).astype(np.float32)


def median_sq_distance(x: np.ndarray, seed: int, n: int = 1000) -> float:
    """The median squared distance between unit rows (on a seeded sample): the RBF width heuristic."""
    rng = np.random.default_rng(seed)
    s = unit_rows(x[rng.choice(len(x), min(n, len(x)), replace=False)])
    d = 2.0 - 2.0 * (s @ s.T)
    return float(np.median(d[np.triu_indices(len(s), 1)]))


class KernelRidgeMap:
    """Kernel ridge regression source -> target over unit-length source rows (dual form)."""

    def __init__(self, support, dual, target_mean, kernel_name: str, gamma: float, degree: int):
        self.support, self.dual, self.target_mean = support, dual, target_mean
        self.kernel_name, self.gamma, self.degree = kernel_name, gamma, degree

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, alpha: float, kernel_name: str, gamma: float, degree: int
    ) -> KernelRidgeMap:
        support = unit_rows(x)
        gram = kernel(support, support, kernel_name, gamma, degree).astype(np.float64)
        gram[np.diag_indices_from(gram)] += alpha
        my = y.mean(0)
        factor = scipy.linalg.cho_factor(gram, overwrite_a=True, check_finite=False)
        dual = scipy.linalg.cho_solve(factor, (y - my).astype(np.float64), check_finite=False)
        return cls(support, dual.astype(np.float32), my, kernel_name, gamma, degree)

    def embed_source(self, x: np.ndarray) -> np.ndarray:
        k = kernel(unit_rows(x), self.support, self.kernel_name, self.gamma, self.degree)
        return k @ self.dual + self.target_mean

    def embed_target(self, y: np.ndarray) -> np.ndarray:
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        return {"support": self.support, "dual": self.dual, "target_mean": self.target_mean}

    def state(self) -> dict[str, Any]:
        return {"kernel": self.kernel_name, "gamma": self.gamma, "degree": self.degree}

    @classmethod
    def restore(cls, a: dict[str, np.ndarray], s: dict[str, Any]) -> KernelRidgeMap:
        return cls(a["support"], a["dual"], a["target_mean"], s["kernel"], s["gamma"], s["degree"])


def _inverse_sqrt(cov: np.ndarray, reg: float) -> np.ndarray:
    """(cov + reg * mean-eigenvalue * I)^(-1/2): the regularised whitening of one side."""
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 0.0) + reg * max(float(vals.mean()), 1e-12)
    return (vecs / np.sqrt(vals)) @ vecs.T


class SharedSpaceMap:
    """CCA (whitened, regularised) or PLS-SVD (no whitening): both sides projected onto paired
    directions of maximal correlation / covariance, each direction scaled by its strength^power."""

    def __init__(self, source_mean, target_mean, source_proj, target_proj):
        self.source_mean, self.target_mean = source_mean, target_mean
        self.source_proj, self.target_proj = source_proj, target_proj

    @staticmethod
    def decompose(x: np.ndarray, y: np.ndarray, whiten: bool, reg: float) -> tuple[np.ndarray, ...]:
        """(source mean, target mean, source directions, target directions, strengths), strongest first,
        directions scaled so each projected component has unit variance on the training rows (the two
        sides then share one scale, which Euclidean ranking needs). Every component count and power is
        a cheap cut of this, so a search decomposes once."""
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my  # float32: twice as fast, and ample for regularised problems
        cross = xc.T @ yc / len(x)
        if whiten:
            wx = _inverse_sqrt(xc.T @ xc / len(x), reg)
            wy = _inverse_sqrt(yc.T @ yc / len(y), reg)
            u, s, vt = np.linalg.svd(wx @ cross @ wy, full_matrices=False)
            a, b = wx @ u, wy @ vt.T
        else:
            u, s, vt = np.linalg.svd(cross, full_matrices=False)
            a, b, s = u, vt.T, s / s[0]
        sample = np.random.default_rng(0).choice(len(x), min(len(x), 5000), replace=False)
        a = a / np.maximum((xc[sample] @ a).std(0), 1e-12)
        b = b / np.maximum((yc[sample] @ b).std(0), 1e-12)
        return mx, my, a, b, s

    @classmethod
    def from_decomposition(
        cls, parts: tuple[np.ndarray, ...], n_components: int, power: float
    ) -> SharedSpaceMap:
        mx, my, a, b, s = parts
        k = min(n_components, len(s))
        strength = np.maximum(s[:k], 1e-12) ** power
        return cls(mx, my, (a[:, :k] * strength).astype(np.float32), (b[:, :k] * strength).astype(np.float32))

    def embed_source(self, x: np.ndarray) -> np.ndarray:
        return (x - self.source_mean) @ self.source_proj

    def embed_target(self, y: np.ndarray) -> np.ndarray:
        return (y - self.target_mean) @ self.target_proj

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "source_mean": self.source_mean,
            "target_mean": self.target_mean,
            "source_proj": self.source_proj,
            "target_proj": self.target_proj,
        }

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def restore(cls, a: dict[str, np.ndarray], state: dict[str, Any]) -> SharedSpaceMap:
        return cls(a["source_mean"], a["target_mean"], a["source_proj"], a["target_proj"])
