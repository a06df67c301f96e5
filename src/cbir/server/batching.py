"""Micro-batching of concurrent searches: requests do not queue behind one lock, they share the work.

Each request hands its query (a sentence, or a vector it already has) to one worker thread and waits.
The worker takes everything that is waiting, embeds the sentences in one batch and searches all the
vectors in one search (NumPy, or FAISS for a large index), then answers each request. Under load a
batch holds as many queries as arrived during the previous one, so the per-query cost of the encoder
and the search falls as concurrency rises; alone, a query waits for nothing. The encoders run on this
one thread only, so their lazily filled state needs no lock.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from cbir.index import SearchIndex, SearchResult

MAX_BATCH = 64


@dataclass
class Job:
    k: int
    text: str | None = None
    vector: np.ndarray | None = None
    photo_share: float = 0.0  # how much of the query is photos (its calibration curve)
    done: Future = field(default_factory=Future)


class SearchBatcher:
    """Runs the searches of concurrent callers in batches on one worker thread."""

    def __init__(self, index: SearchIndex, max_batch: int = MAX_BATCH):
        self.index = index
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve, name="cbir-search-batcher", daemon=True)
        self._worker.start()

    def search_text(self, text: str, k: int) -> list[SearchResult]:
        return self._submit(Job(k, text=text))

    def search_vector(self, vector: np.ndarray, k: int, photo_share: float = 0.0) -> list[SearchResult]:
        return self._submit(Job(k, vector=np.asarray(vector, dtype=np.float32), photo_share=photo_share))

    def _submit(self, job: Job) -> list[SearchResult]:
        self._jobs.put(job)
        return job.done.result()

    def _serve(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        """One batch; a failure is answered to the jobs it concerns (all of them when the batch as a
        whole fails, e.g. one sentence the encoder refuses: then each is retried alone)."""
        index = self.index  # one snapshot per batch (the folder watcher may publish a newer one)
        try:
            vectors = self._vectors(index, batch)
            shares = [job.photo_share for job in batch]
            found = index.search_vectors(vectors, max(job.k for job in batch), photo_shares=shares)
        except Exception as e:
            if len(batch) == 1:
                batch[0].done.set_exception(e)
                return
            for job in batch:
                self._run([job])
            return
        for job, results in zip(batch, found, strict=True):
            job.done.set_result(results[: job.k])

    @staticmethod
    def _vectors(index: SearchIndex, batch: list[Job]) -> np.ndarray:
        texts = [i for i, job in enumerate(batch) if job.text is not None]
        embedded = iter(index.embed_texts([batch[i].text for i in texts]) if texts else [])
        return np.stack([next(embedded) if job.text is not None else job.vector for job in batch])
