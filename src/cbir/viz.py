"""Pictures of search results: a query with its top images in a grid, and a 2-D map of an index."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cbir.index import SearchIndex, SearchResult

TRUTH_COLOR = "#1a9850"
QUERY_COLOR = "#d73027"
THUMB = 256
MAP_POINTS = 5000  # larger indexes are drawn as a sample of this many dots (the top results always in)
MAP_SAMPLE_THUMBS = 40  # thumbnails of images outside the top results on the map, a seeded sample
NAME_CHARS = 26  # file names under thumbnails are shortened to this many characters


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


def short_name(image_id: str, limit: int = NAME_CHARS) -> str:
    """The file name of an image id, shortened in the middle to fit under a thumbnail."""
    name = os.fsencode(Path(image_id).name).decode("utf-8", "backslashreplace")  # as the CLI shows it
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: keep - keep // 2] + "…" + name[-(keep // 2) :]


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
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, label, is_truth) in zip(axes.flat, cells, strict=False):
        ax.imshow(thumbnail(path))
        ax.set_title(label, fontsize=10, color=TRUTH_COLOR if is_truth else "black")
        ax.text(0.5, -0.03, short_name(path.name), transform=ax.transAxes, ha="center", va="top", fontsize=8)
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


def map_rows(n: int, top: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows drawn as dots, rows drawn as thumbnails): every row up to `MAP_POINTS`, else a seeded
    sample that always keeps the top results; thumbnails for the top results and a sample of the rest."""
    rng = np.random.default_rng(seed)
    top = np.asarray(list(top), dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), top)
    if n > MAP_POINTS:
        rest = np.sort(rng.choice(rest, MAP_POINTS - len(top), replace=False))
    sampled = rng.choice(rest, min(MAP_SAMPLE_THUMBS, len(rest)), replace=False)
    return np.union1d(rest, top), np.concatenate([np.sort(sampled), top])


def embedding_map_figure(
    index: SearchIndex, query: str, out: Path | str, highlight: Sequence[str] = (), seed: int = 0
) -> Path:
    """PCA of the indexed image vectors to 2-D with the text query placed by the same projection. The
    query's top results are drawn as ringed thumbnails with their rank, a sample of the other images as
    small thumbnails, the rest as dots (a sample of `MAP_POINTS` for large indexes): readable at 10k."""
    from sklearn.decomposition import PCA

    plt = _pyplot()

    top = [index.ids.index(i) for i in highlight if i in index]
    rows, thumbs = map_rows(len(index), top, seed)
    vectors = np.asarray(index.vectors[rows], dtype=np.float32)
    query_vec = index.embed_text(query)
    pca = PCA(n_components=2, random_state=seed).fit(np.vstack([vectors, query_vec]))
    position = dict(zip(rows.tolist(), pca.transform(vectors), strict=True))
    q = pca.transform(query_vec[None])[0]
    fig, ax = plt.subplots(figsize=(11, 10))
    xy = np.array([position[r] for r in rows])
    ax.scatter(xy[:, 0], xy[:, 1], s=4 if len(rows) > 1000 else 10, c="#999999", alpha=0.4, label="images")
    for row in thumbs:
        rank = top.index(row) + 1 if row in top else None
        _thumb_on_map(ax, index, row, position[row], rank)
    ax.scatter([q[0]], [q[1]], marker="*", s=600, c=QUERY_COLOR, edgecolors="black", label="query", zorder=9)
    label = {"boxstyle": "round", "fc": "white", "alpha": 0.8}
    ax.annotate(
        f"“{query}”", q, xytext=(10, 10), textcoords="offset points", fontsize=12, color=QUERY_COLOR,
        zorder=9, bbox=label,
    )  # fmt: skip
    shown = f"{len(rows)} of {len(index)}" if len(rows) < len(index) else f"{len(index)}"
    ax.set_title(
        f"{shown} images of {index.root.name} (PCA of their vectors), the query, its top {len(top)} "
        f"results (red, ranked) and a sample of the others",
        fontsize=11,
    )
    ax.legend(loc="lower right")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _thumb_on_map(ax, index: SearchIndex, row: int, xy: np.ndarray, rank: int | None) -> None:
    """One image on the map: a top result large, framed in red with its rank; a sampled one small."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    size, zoom = (96, 0.55) if rank else (64, 0.45)
    box = OffsetImage(thumbnail(index.root / index.ids[row], size), zoom=zoom)
    frame = {"edgecolor": QUERY_COLOR, "linewidth": 2} if rank else {"edgecolor": "white", "linewidth": 1}
    ax.add_artist(AnnotationBbox(box, xy, frameon=True, bboxprops=frame, zorder=8 if rank else 4, pad=0.1))
    if rank:
        ax.annotate(str(rank), xy, xytext=(-18, 16), textcoords="offset points", fontsize=10, zorder=9,
                    color="white", weight="bold", bbox={"boxstyle": "circle", "fc": QUERY_COLOR})  # fmt: skip
