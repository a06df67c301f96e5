"""cbir: content-based image retrieval by sentence or by example.

Importing this package is cheap; the heavy parts (torch, faiss) load when first used.
"""

__version__ = "0.1.0"
