"""The classical family: bag-of-words / TF-IDF / word-vector / sentence features of captions and
encoder / tag features of images, related by ridge, kernel ridge, CCA or PLS, and fused.

The models live in `cbir.models.classical.model` (found by name through `cbir.models.METHODS`); this
package imports nothing, so the caption features the deep models share (`text_features`) load without
SciPy."""
