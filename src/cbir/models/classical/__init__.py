"""The classical family: bag-of-words / TF-IDF / word-vector / sentence features of captions and
encoder / tag features of images, related by ridge, kernel ridge, CCA or PLS, and fused."""

from cbir.models.classical.model import CCAModel, ClassicalModel, KernelRidgeModel, PLSModel, RidgeModel

__all__ = ["CCAModel", "ClassicalModel", "KernelRidgeModel", "PLSModel", "RidgeModel"]
