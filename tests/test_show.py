"""`cbir show` pictures (issue 14): file names under the thumbnails, and a map that stays readable at
10k photos (the top results and the query drawn as thumbnails, a sample of the rest)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir import viz
from cbir.index import SearchResult
from tests.conftest import KAGGLE_MINI

IMAGES = KAGGLE_MINI / "images_train"


def recorded_texts(monkeypatch) -> list[str]:
    import matplotlib.axes

    texts: list[str] = []
    real = matplotlib.axes.Axes.text

    def text(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return real(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    return texts


def test_grid_writes_each_file_name_under_its_thumbnail(tmp_path, monkeypatch):
    texts = recorded_texts(monkeypatch)
    long_name = tmp_path / ("a-very-long-holiday-photo-name-from-the-camera-" + "x" * 20 + ".jpg")
    long_name.write_bytes((IMAGES / "7.jpg").read_bytes())
    results = [
        SearchResult(1, 0.9, "7.jpg", IMAGES / "7.jpg"),
        SearchResult(2, 0.8, "12.jpg", IMAGES / "12.jpg"),
        SearchResult(3, 0.7, long_name.name, long_name),
    ]
    out = viz.results_grid("a query", results, tmp_path / "grid.png")
    assert out.stat().st_size > 10_000
    assert "7.jpg" in texts and "12.jpg" in texts
    shortened = viz.short_name(long_name.name)
    assert shortened in texts and len(shortened) == viz.NAME_CHARS and shortened.endswith("xxx.jpg")


def test_map_rows_keep_every_top_result_and_cap_the_dots():
    top = [9_999, 5, 4_321]
    dots, thumbs = viz.map_rows(10_000, top)
    assert len(dots) == viz.MAP_POINTS and set(top) <= set(dots.tolist())
    assert list(thumbs[-3:]) == top and len(thumbs) == viz.MAP_SAMPLE_THUMBS + 3
    assert set(thumbs.tolist()) <= set(dots.tolist())
    small_dots, small_thumbs = viz.map_rows(30, [0, 1])
    assert len(small_dots) == 30 and len(small_thumbs) == 30  # a small index: every photo a thumbnail


class TenThousandPhotos:
    """What the map reads of an index (ids, vectors, root, a text query's vector), for n photos with
    random vectors; the real photos of the test folder, repeated."""

    def __init__(self, n: int = 10_000, dim: int = 64):
        rng = np.random.default_rng(0)
        names = sorted(p.name for p in IMAGES.glob("*.jpg"))
        self.root = IMAGES
        self.ids = [names[i % len(names)] + "?" * (i // len(names)) for i in range(n)]  # unique ids
        self.vectors = rng.standard_normal((n, dim)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in set(self.ids)

    def embed_text(self, text: str) -> np.ndarray:
        return self.vectors[:10].mean(0)


def test_map_of_10k_photos_draws_the_top_results_and_a_sample(tmp_path, monkeypatch):
    drawn: list[tuple[int, int | None]] = []
    real = viz._thumb_on_map

    def record(ax, index, row, xy, rank):
        drawn.append((row, rank))
        return real(ax, index, row, xy, rank)

    monkeypatch.setattr(viz, "_thumb_on_map", record)
    index = TenThousandPhotos()
    top = [index.ids[r] for r in (7, 5_000, 9_999)]
    out = viz.embedding_map_figure(index, "a query", tmp_path / "map.png", highlight=top)
    assert out.stat().st_size > 50_000
    ranked = [(row, rank) for row, rank in drawn if rank is not None]
    assert ranked == [(7, 1), (5_000, 2), (9_999, 3)]
    assert len(drawn) - len(ranked) == viz.MAP_SAMPLE_THUMBS


@pytest.mark.parametrize("n", [1, 3])
def test_map_of_a_tiny_index(tmp_path, n):
    index = TenThousandPhotos(n, 8)
    out = viz.embedding_map_figure(index, "q", tmp_path / "map.png", highlight=index.ids[:1])
    assert out.exists()
