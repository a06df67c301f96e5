"""A searchable index of a photo folder: open it, query it by text or image (`cbir.indexing` builds it).

On disk an index is a directory:
  `index.sqlite` manifest (`cbir.manifest`): the indexed folder, the model folder, the vector shards
                 with their SHA-1, and one entry per image (id, size, mtime, content hash, EXIF meta, and
                 where its vector lives: shard file + row); unreadable files too.
  `shards/*.npy` float32 vectors, one shard per committed chunk, merged as the index grows
                 (`cbir.indexing.compaction_group`); a small index is one shard, memory-mapped on open.
  `shards/*.hnsw`, `shards/*.ivfpq`  the approximate index (HNSW, or IVF-PQ for the largest) of the
                 vectors, only above `cbir.ann.ANN_THRESHOLD` images (see `cbir.ann`), named after the
                 shards it holds (every row of each); the manifest names it and those shards. It is kept
                 across small changes: readers search the entries of other shards exactly and drop its
                 rows of removed photos (`cbir.ann.DeltaSearcher`).
  `model-<fingerprint>/`  a copy of the model that embedded the images (the shipped default unless
                 named), so an index is self-contained and queries are embedded by the same model.

Files are written aside and renamed into place, never changed once written, and published by one
SQLite transaction per chunk, so the index on disk is always consistent: a killed run loses at most the
chunks it was embedding, and a rerun finds what is done, embeds only new or changed files, and drops
deleted ones. The manifest names every file a reader opens (model folder and shards), and a reader reads
it in one transaction, so it gets one consistent snapshot. A new model (or folder) is built aside, in a
generation under `next`, while readers keep the complete old one; one transaction switches them over.
One writer at a time holds `.cbir-lock`; readers take no lock and reread the manifest if a file they
listed is gone. Each shard's SHA-1 is verified on open (up to `VERIFY_ON_OPEN_MAX_BYTES`) and by every
full rerun (one that adds named photos checks the shards whose file changed since their last check:
size, times, inode), which re-embeds the images of a damaged shard (from the feature cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir import ann
from cbir.encoders.cache import file_hash
from cbir.manifest import MANIFEST, IndexFormatError, read_manifest

if TYPE_CHECKING:
    from cbir.filters import Filters
    from cbir.models.base import RetrievalModel

SHARDS = "shards"
LOCK_FILE = ".cbir-lock"
MODEL_DIR = "model"  # the model folder of indexes written before it was named by fingerprint
CHUNK_SIZE = 256
# Opening verifies shard checksums up to this many bytes of shards (~40k 1,664-d images; SHA-1 runs at
# 0.7-1.4 GB/s here, see BENCHMARKS.md); larger indexes are verified by every full `cbir index` rerun.
VERIFY_ON_OPEN_MAX_BYTES = 256 << 20
OPEN_ATTEMPTS = 5  # a reader rereads a manifest that changed under it this many times at most


def __getattr__(name: str) -> Any:
    """The write path lives in `cbir.indexing` (which imports this module); its public names are still
    importable from here (`from cbir.index import build_index, update_index`)."""
    if name in ("build_index", "update_index", "IndexReport", "EncodeStage", "local_encode_chunks"):
        import cbir.indexing

        return getattr(cbir.indexing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ShardError(IndexFormatError):
    """A vector shard that is missing or damaged; a rerun of `cbir index` rebuilds it."""

    def __init__(self, path: Path, problem: str):
        self.problem = f"{path}: {problem}"
        super().__init__(f"{self.problem}; rerun `cbir index` on the same folder and --out to rebuild it")


@dataclass
class SearchResult:
    rank: int  # 1 = best, as everywhere a rank is shown (CLI, --json, HTTP, page)
    score: float  # P(match) for a calibrated model (cbir.calibration), else the similarity
    id: str  # image path relative to the indexed folder, posix
    path: Path  # absolute path of the image file
    similarity: float | None = None  # the raw inner product of the unit query and the image vector

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def printable(name: Path | str) -> str:
    """A file name or path as valid text that any terminal, JSON reader or URL takes: the bytes of a
    name that is not UTF-8 appear as \\xNN (the exact name is `os.fsencode` of the id, with its \\udcNN
    escapes). `SearchIndex.id_of` maps a printable id back to the image."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _source_of(manifest: dict[str, Any]) -> str:
    """The model an index was built with; indexes written before the shipped default recorded the
    zero-shot model as no source."""
    return manifest.get("model_source") or "zero-shot"


def _model_dir_of(manifest: dict[str, Any]) -> str:
    return manifest.get("model_dir") or MODEL_DIR


def _is_model_dir(name: str) -> bool:
    return name == MODEL_DIR or name.startswith(f"{MODEL_DIR}-")


def _load_shard(index_dir: Path, name: str, checksum: str | None, mmap: bool = True) -> np.ndarray:
    """One shard's rows, its checksum verified first when the manifest has one; errors name the file."""
    path = index_dir / SHARDS / name
    try:
        if checksum is None or file_hash(path) == checksum:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        problem = "damaged shard (checksum mismatch)"
    except FileNotFoundError:
        problem = "shard missing"
    except (OSError, ValueError, EOFError) as e:
        problem = f"damaged shard ({e})"
    raise ShardError(path, problem)


def _vectors_of(
    index_dir: Path,
    entries: Sequence[dict[str, Any]],
    checksums: dict[str, str | None] | None = None,
    mmap: bool = True,
) -> np.ndarray:
    """Vectors in entry order. One shard holding exactly the entries, in order, is memory-mapped as is;
    otherwise each shard's rows are gathered at once into a new array."""
    if not entries:
        return np.zeros((0, 0), dtype=np.float32)
    sums = checksums or {}
    positions: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        positions.setdefault(e["shard"], []).append(i)
    loaded = {s: _load_shard(index_dir, s, sums.get(s), mmap) for s in positions}
    rows = np.fromiter((e["row"] for e in entries), dtype=np.int64, count=len(entries))
    try:
        if len(loaded) == 1:
            (arr,) = loaded.values()
            if len(arr) == len(rows) and np.array_equal(rows, np.arange(len(rows))):
                return arr
            return np.asarray(arr[rows], dtype=np.float32)
        dim = next(iter(loaded.values())).shape[1]
        vectors = np.empty((len(entries), dim), dtype=np.float32)
        for name, where in positions.items():
            at = np.asarray(where)
            vectors[at] = loaded[name][rows[at]]
        return vectors
    except (IndexError, ValueError) as e:
        raise IndexFormatError(f"{index_dir / MANIFEST}: an entry points past the end of its shard") from e


def _ann_path(index_dir: Path, entries: Sequence[dict[str, Any]]) -> Path | None:
    """The approximate index of a generation written before the manifest named it: named after the
    layout of its vectors (shard and row of each, in order) and by its kind; None: searched exactly."""
    kind = ann.kind_for(len(entries))
    if kind is None:
        return None
    layout = hashlib.sha1()
    for e in entries:
        layout.update(f"{e['shard']}:{e['row']}\n".encode())
    return index_dir / SHARDS / f"{layout.hexdigest()[:32]}{ann.SUFFIXES[kind]}"


def _ann_of(index_dir: Path, manifest: dict[str, Any]) -> tuple[Path | None, list[Any] | None]:
    """The approximate index a reader searches and the shards it covers ([name, rows, …] in its row
    order; None: it holds every entry, in order, as in indexes written before the manifest named it)."""
    named = manifest.get("ann")
    if named is None:
        return _ann_path(index_dir, manifest["entries"]), None
    return index_dir / SHARDS / named["name"], named["shards"]


def _coverage(entries: Sequence[dict[str, Any]], covers: list[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """For an approximate index over `covers`: the entry (row of the vectors) at each of its rows (-1:
    removed since), and the entries it does not cover."""
    if covers is None:
        return np.arange(len(entries)), np.zeros(0, dtype=np.int64)
    start, total = {}, 0
    for name, rows, *_ in covers:
        start[name], total = total, total + rows
    at = np.fromiter((start.get(e["shard"], -1) for e in entries), dtype=np.int64, count=len(entries))
    rows = np.fromiter((e["row"] for e in entries), dtype=np.int64, count=len(entries))
    covered = at >= 0
    to_global = np.full(total, -1, dtype=np.int64)
    to_global[at[covered] + rows[covered]] = np.flatnonzero(covered)
    return to_global, np.flatnonzero(~covered)


def vector_search(vectors: np.ndarray, exact: bool = True):
    """A search over unit-scale vectors: exact inner products (`ann.Exact`, NumPy) or a FAISS HNSW."""
    return ann.Exact(vectors) if exact else ann.hnsw(vectors)


def _checksums_to_verify(index_dir: Path, manifest: dict[str, Any]) -> dict[str, str] | None:
    """The manifest's shard checksums, unless the shards are too large to hash on every open."""
    sums = manifest.get("shards") or {}
    shards = [index_dir / SHARDS / name for name in sums]
    size = sum(p.stat().st_size for p in shards if p.exists())
    return sums if size <= VERIFY_ON_OPEN_MAX_BYTES else None


class SearchIndex:
    """An opened index: the model loads once here, then each query is one embedding + one search (exact
    in NumPy, or FAISS's approximate index above `ann.ANN_THRESHOLD`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], model: RetrievalModel | None = None):
        from cbir.models import load_model

        self.path = path
        self.root = Path(manifest["root"])
        self.model_source = _source_of(manifest)
        self.ids: list[str] = [e["id"] for e in manifest["entries"]]
        self.failed: dict[str, str] = {f["id"]: f["reason"] for f in manifest.get("failed", [])}
        self._indexed_stat = {e["id"]: (e["size"], e["mtime_ns"]) for e in manifest["entries"]}
        # For filters: EXIF capture date and camera (None in indexes written before they were recorded),
        # as JSON text until a filter asks (`meta`).
        self._meta: list[str | dict[str, Any] | None] = [e.get("meta") for e in manifest["entries"]]
        self.mtimes_ns: list[int] = [e["mtime_ns"] for e in manifest["entries"]]
        self._row = {image_id: i for i, image_id in enumerate(self.ids)}
        # Ids that are not valid UTF-8, by their printable name (an exact id of that spelling wins).
        self._printable = {printable(i): i for i in self.ids if printable(i) != i}
        self.vectors = (
            _vectors_of(path, manifest["entries"], _checksums_to_verify(path, manifest))
            if self.ids
            else np.zeros((0, 1), np.float32)
        )
        self.model_dir = path / _model_dir_of(manifest)
        self.model = model if model is not None else load_model(self.model_dir)
        self._ann, covers = _ann_of(path, manifest)
        self._coverage = _coverage(manifest["entries"], covers) if self._ann is not None else None
        self._faiss = None
        self._prefix_faiss: dict[int, Any] = {}

    @classmethod
    def open(cls, path: Path | str, model: RetrievalModel | None = None) -> SearchIndex:
        """Open without a lock: if a writer published a new manifest (and swept the shards or model
        folder of the old one) while this was reading, read again; only a fault that persists is an
        error (IndexFormatError, or ModelError: both ValueError). `model`: the index's model, already
        loaded by the writer that just published it (it is not loaded again)."""
        index_dir = Path(path).expanduser().resolve()
        manifest = read_manifest(index_dir, raw_meta=True)
        for _ in range(OPEN_ATTEMPTS - 1):
            try:
                return cls(index_dir, manifest, model)
            except (ValueError, OSError):
                latest = read_manifest(index_dir, raw_meta=True)
                if latest == manifest:
                    raise
                manifest, model = latest, None  # a newer manifest may name another model
        return cls(index_dir, manifest)

    @cached_property
    def meta(self) -> list[dict[str, Any] | None]:
        """Each entry's EXIF meta, decoded on first use: most searches filter on none of it."""
        return [json.loads(m) if isinstance(m, str) else m for m in self._meta]

    @property
    def approximate(self) -> bool:
        return self._ann is not None and self._ann.exists()

    def _index(self):
        if self._faiss is None:
            if self.approximate:
                import faiss

                # One query at a time: OpenMP threads only add spin-wait overhead (badly so on a busy
                # machine).
                faiss.omp_set_num_threads(1)
                self._faiss = ann.DeltaSearcher.open(self._ann, self.vectors, *self._coverage)
            else:
                self._faiss = vector_search(self.vectors, exact=True)
        return self._faiss

    def _prefix_of(self, query: np.ndarray) -> slice:
        """Queries that are zero past some dimension (text queries of the zero-shot model) are scored
        on the leading dimensions only: the same inner products for a fraction of the work."""
        nonzero = np.flatnonzero(query)
        end = int(nonzero[-1]) + 1 if len(nonzero) else 1
        return slice(0, end if end < query.shape[0] and not self.approximate else query.shape[0])

    def _index_for(self, query: np.ndarray):
        end = self._prefix_of(query).stop
        if end == query.shape[0]:
            return self._index()
        if end not in self._prefix_faiss:
            self._prefix_faiss[end] = vector_search(self.vectors[:, :end], exact=True)
        return self._prefix_faiss[end]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __repr__(self) -> str:
        model = self.model_source
        return f"SearchIndex({self.path}: {len(self)} images of {self.root}, model {model})"

    def id_of(self, name: str) -> str:
        """The id of an image given by its id or by its `printable` name (how HTTP clients see it)."""
        if name in self._row:
            return name
        if name in self._printable:
            return self._printable[name]
        raise KeyError(name)

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._row:
            raise KeyError(image_id)
        return self.root / image_id

    def indexed_file(self, image_id: str) -> Path:
        """The image file, only if it is still the regular file that was indexed (same size and
        modification time): a photo since replaced, by a symlink to /etc/passwd say, is not served."""
        path = self.image_path(image_id)
        try:
            st = path.stat()
        except OSError as e:
            raise FileNotFoundError(f"{path}: {e.strerror or e}") from e
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != self._indexed_stat[image_id]:
            raise FileNotFoundError(f"{path}: changed since it was indexed; rerun `cbir index`")
        return path

    def vector(self, image_id: str) -> np.ndarray:
        return np.asarray(self.vectors[self._row[image_id]], dtype=np.float32)

    # Query embeddings -----------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Query sentences' vectors, in one batch."""
        from threadpoolctl import threadpool_limits

        if not all(t.strip() for t in texts):
            raise ValueError("empty text query")
        # Short sentences: BLAS threads cost far more than they save (10x on a busy machine).
        with threadpool_limits(1, user_api="blas"):
            return self.model.embed_texts(list(texts))

    def embed_image(self, image: Path | str | bytes) -> np.ndarray:
        """A query image's vector: a file path, or raw bytes of an uploaded file. Its features are
        not written to the feature cache: a query photo (an upload above all) is not kept on disk."""
        from cbir.datasets import Dataset
        from cbir.encoders.cache import transient

        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(image, bytes | bytearray):
                path = Path(tmp) / "query"
                path.write_bytes(image)
            else:
                path = Path(image).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such image file")
            with transient():
                embedding = self.model.embed(Dataset.from_paths([path]))
        for reason in embedding.failed.values():
            shown = "the uploaded image" if isinstance(image, bytes | bytearray) else path
            raise ValueError(f"{shown}: {reason}")
        return embedding.vectors[0]

    # Searches ---------------------------------------------------------------------------------
    def search_vector(
        self, query: np.ndarray, k: int = 20, min_score: float | None = None, photo_share: float = 0.0
    ) -> list[SearchResult]:
        """The k best images for a query vector. Scores are the model's calibrated P(match) of the inner
        product with the query scaled to unit length (the similarity itself for an uncalibrated model): the
        one score scale of every search (text, image, similar, combined; CLI, API, page). `photo_share`:
        how much of the query is photos, 0 for words to 1 for photos (they have their own curve)."""
        query = np.asarray(query, dtype=np.float32)[None]
        return self.search_vectors(query, k, min_score, [photo_share])[0]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 20,
        min_score: float | None = None,
        photo_shares: Sequence[float] | None = None,
    ) -> list[list[SearchResult]]:
        """`search_vector` for a batch of query rows at once: one search (one matrix product, or one FAISS
        call above the ANN threshold) per group of queries that share a scored prefix (the server
        batches concurrent requests through this)."""
        from cbir.calibration import match_scores

        shares = list(photo_shares) if photo_shares is not None else [0.0] * len(queries)
        queries = np.asarray(queries, dtype=np.float32)
        if not len(self) or k <= 0:
            return [[] for _ in range(len(queries))]
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        groups: dict[int, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(self._prefix_of(query).stop, []).append(i)
        found: list[list[SearchResult]] = [[] for _ in range(len(queries))]
        for end, members in groups.items():
            index = self._index_for(queries[members[0]])
            similarities, rows = index.search(np.ascontiguousarray(queries[members, :end]), min(k, len(self)))
            for i, raw, id_row in zip(members, similarities, rows, strict=True):
                found[i] = self._results(match_scores(self.model, raw, shares[i]), raw, id_row, min_score)
        return found

    def _results(
        self, scores: np.ndarray, similarities: np.ndarray, rows: np.ndarray, min_score: float | None
    ) -> list[SearchResult]:
        results = []
        for score, similarity, row in zip(scores, similarities, rows, strict=True):
            if row < 0 or (min_score is not None and score < min_score):
                continue
            image_id = self.ids[row]
            path = self.root / image_id
            results.append(SearchResult(len(results) + 1, float(score), image_id, path, float(similarity)))
        return results

    @property
    def calibrated(self) -> bool:
        """Whether scores are P(match) (the model carries a calibration) rather than raw similarities."""
        return self.model.calibration is not None

    def search_text(self, query: str, k: int = 20, min_score: float | None = None) -> list[SearchResult]:
        return self.search_vector(self.embed_text(query), k, min_score)

    def search_image(
        self, image: Path | str | bytes, k: int = 20, min_score: float | None = None
    ) -> list[SearchResult]:
        return self.search_vector(self.embed_image(image), k, min_score, photo_share=1.0)

    def search_similar(
        self, image_id: str, k: int = 20, min_score: float | None = None
    ) -> list[SearchResult]:
        if image_id not in self._row:
            raise KeyError(image_id)
        return self.search_vector(self.vector(image_id), k, min_score, photo_share=1.0)

    def find(
        self,
        query: str | Sequence[str] | None = None,
        *,
        image: Path | str | bytes | None = None,
        more_like: Sequence[str] = (),
        less_like: Sequence[str] = (),
        filters: Filters | None = None,
        k: int = 20,
        offset: int = 0,
        min_score: float | None = None,
        allow_files: bool = True,
    ) -> list[SearchResult]:
        """A steered search: query arithmetic (`"a dog" + "beach" - "people"`, `snow:0.5`, `img:PATH`,
        `id:IMAGE_ID`; see `cbir.query`), relevance feedback (ids of photos marked good / bad),
        filters applied before ranking, and results `offset+1 … offset+k`."""
        from cbir.steer import search_page, steered_vector

        vector, share = steered_vector(self, query, image, more_like, less_like, allow_files=allow_files)
        return search_page(self, vector, filters, k, offset, min_score, share)

    def search(
        self,
        text: str | None = None,
        image: Path | str | bytes | None = None,
        k: int = 20,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """Text, image, or both: the query is the sum of the unit text and unit image vectors."""
        parts = []
        if text is not None and text.strip():
            parts.append(self.embed_text(text))
        if image is not None:
            parts.append(self.embed_image(image))
        if not parts:
            raise ValueError("give a text query, an image, or both")
        query = sum(p / max(float(np.linalg.norm(p)), 1e-12) for p in parts)
        share = (image is not None) / len(parts)
        return self.search_vector(query, k, min_score, share)
