"""`ridge` is now one member of the classical family (`cbir.models.classical`); this module keeps the
foundation's import path for it and its helpers."""

from cbir.models.classical.image_representation import resolve_image_representation
from cbir.models.classical.mappings import ridge_solve
from cbir.models.classical.model import RidgeModel
from cbir.models.classical.text_features import unit_rows

__all__ = ["RidgeModel", "resolve_image_representation", "ridge_solve", "unit_rows"]
