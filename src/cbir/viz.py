"""Pictures of search results: a query with its top images in a grid, and a 2-D map of an index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cbir.index import SearchIndex, SearchResult

TRUTH_COLOR = "#1a9850"
QUERY_COLOR = "#d73027"
THUMB = 256
MAP_THUMBS = 150  # up to this many images are drawn as thumbnails on the map, dots beyond


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def thumbnail(path: Path, size: int = THUMB) -> np.ndarray:
    """A square centre crop of the image as RGB pixels (grey if the file cannot be read)."""
    from PIL import Image, ImageOps

    from cbir.imaging import to_rgb

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.fit(to_rgb(im, size), (size, size)))
    except Exception:  # a missing or broken file still gets its cell, marked by the grey square
        return np.full((size, size, 3), 200, dtype=np.uint8)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def caption_truth(index: SearchIndex, text: str) -> str | None:
    """The indexed image a query describes, when the indexed folder belongs to a captioned dataset
    (its own folder or its parent, e.g. `images_train` of the Kaggle layout) and the query is one of
    its captions; None otherwise."""
    from cbir.datasets import DatasetError, detect_format, load_dataset

    wanted = _normalise(text)
    for base in (index.root, index.root.parent):
        try:
            if detect_format(base) == "folder":
                continue
            data = load_dataset(base)
        except (DatasetError, OSError, ValueError):
            continue
        for caption, image in zip(data.captions, data.caption_image, strict=True):
            if image >= 0 and _normalise(caption) == wanted:
                path = data.images[image]
                try:
                    image_id = path.resolve().relative_to(index.root).as_posix()
                except ValueError:
                    continue
                if image_id in index:
                    return image_id
    return None


def results_grid(
    query: str,
    results: Sequence[SearchResult],
    out: Path | str,
    truth: str | None = None,
    truth_path: Path | None = None,
    truth_rank: int | None = None,
    columns: int = 5,
) -> Path:
    """The query as title, the results in rank order with their scores; the ground-truth image framed
    in green, or shown in an extra cell (with its rank) when it is not among the results."""
    plt = _pyplot()
    cells: list[tuple[Path, str, bool]] = [
        (r.path, f"#{r.rank}  {r.score:.3f}", r.id == truth) for r in results
    ]
    if truth is not None and truth_path is not None and all(r.id != truth for r in results):
        label = "ground truth" + (f" (rank {truth_rank})" if truth_rank is not None else "")
        cells.append((truth_path, label, True))
    rows = max(1, -(-len(cells) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, label, is_truth) in zip(axes.flat, cells, strict=False):
        ax.imshow(thumbnail(path))
        ax.set_title(label, fontsize=10, color=TRUTH_COLOR if is_truth else "black")
        if is_truth:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(TRUTH_COLOR)
                spine.set_linewidth(5)
    fig.suptitle(f"“{query}”", fontsize=13, wrap=True)
    if truth is not None:
        fig.text(0.5, 0.005, "green frame: the image this caption belongs to", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def query_figure(
    index: SearchIndex, query: str, out: Path | str, k: int = 10, truth: str | None = None
) -> tuple[Path, list[SearchResult], str | None]:
    """Search, find the ground truth (given, or looked up in the dataset's captions), draw the grid."""
    results = index.search_text(query, k=k)
    truth = truth if truth is not None else caption_truth(index, query)
    truth_rank = None
    if truth is not None:
        if truth not in index:
            raise KeyError(f"{truth}: no such image in the index")
        ranked = index.search_text(query, k=len(index))
        truth_rank = next((r.rank for r in ranked if r.id == truth), None)
    path = results_grid(query, results, out, truth, index.image_path(truth) if truth else None, truth_rank)
    return path, results, truth


def embedding_map_figure(
    index: SearchIndex, query: str, out: Path | str, highlight: Sequence[str] = (), seed: int = 0
) -> Path:
    """PCA of the indexed image vectors to 2-D with the text query placed by the same projection;
    the query's top results are ringed. Large indexes are subsampled to 5,000 points."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    rng = np.random.default_rng(seed)
    rows = np.arange(len(index))
    if len(rows) > 5000:
        rows = np.sort(rng.choice(rows, 5000, replace=False))
    vectors = np.asarray(index.vectors[rows], dtype=np.float32)
    query_vec = index.embed_text(query)
    pca = PCA(n_components=2, random_state=seed).fit(np.vstack([vectors, query_vec]))
    xy, q = pca.transform(vectors), pca.transform(query_vec[None])[0]
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.scatter(xy[:, 0], xy[:, 1], s=8, c="#888888", alpha=0.5, label="images")
    if len(rows) <= MAP_THUMBS:
        for (x, y), row in zip(xy, rows, strict=True):
            box = OffsetImage(thumbnail(index.root / index.ids[row], 64), zoom=0.5)
            ax.add_artist(AnnotationBbox(box, (x, y), frameon=False))
    marked = [i for i, row in enumerate(rows) if index.ids[row] in set(highlight)]
    ax.scatter(
        xy[marked, 0],
        xy[marked, 1],
        s=500,
        facecolors="none",
        edgecolors=QUERY_COLOR,
        linewidths=2,
        label="top results",
        zorder=6,
    )
    ax.scatter([q[0]], [q[1]], marker="*", s=500, c=QUERY_COLOR, edgecolors="black", label="query", zorder=5)
    ax.annotate(f"“{query}”", q, xytext=(8, 8), textcoords="offset points", fontsize=11, color=QUERY_COLOR)
    ax.set_title(f"{len(index)} images of {index.root.name}, PCA of their vectors, and the query")
    ax.legend(loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
