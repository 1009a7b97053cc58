"""Nearest-neighbour search of unit features by cosine (inner product), with FAISS.

One registry of index kinds, read by `sphereface gallery`, the benchmark and the docs:
exact search (`flat`), a graph (`hnsw`) for large galleries held in memory, and an
inverted file of product-quantised codes (`ivfpq`) for galleries that do not fit in it,
whose candidates are scored again exactly from the stored features. `auto` is exact
up to AUTO_EXACT vectors (docs/benchmarks.md, "gallery search").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from spherecli.core.errors import UserError

# Exact search stays under ~10 ms a query up to here on two cores (docs/benchmarks.md).
AUTO_EXACT = 100_000


@dataclass(frozen=True)
class IndexKind:
    what: str
    factory: Callable[[int, int], str]   # (dimension, vectors) -> FAISS index_factory string
    search_parameter: str | None = None  # the recall-speed knob, set through faiss.ParameterSpace
    search_value: int = 0                # its value: recall@1 >= 0.99 at 1M (docs/benchmarks.md)
    rescored: bool = False               # scores are approximate: candidates are scored again exactly


def _ivf_lists(n: int) -> int:
    """FAISS's guideline: about 4 sqrt(N) lists, each trained on >= 39 points."""
    return int(max(1, min(4 * np.sqrt(n), n // 39)))


def _pq_bytes(d: int) -> int:
    """Sub-quantisers: one byte for every 4 dimensions, a divisor of d."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


INDEX_KINDS = {
    "flat": IndexKind("exact inner product", lambda d, n: "IDMap2,Flat"),
    "hnsw": IndexKind("HNSW graph (32 links), exact scores of the candidates it finds",
                      lambda d, n: "IDMap2,HNSW32,Flat", "efSearch", 128),
    "ivfpq": IndexKind("inverted file of product-quantised codes (d/4 bytes a vector), candidates "
                       "scored again exactly", lambda d, n: f"IVF{_ivf_lists(n)},PQ{_pq_bytes(d)}",
                       "nprobe", 64, rescored=True),
}
INDEX_CHOICES = ("auto", *INDEX_KINDS)


# Product quantisers of 8 bits train 256 centroids on >= 39 points each; below this many
# vectors an ivfpq gallery is searched exactly.
IVFPQ_MIN = 39 * 256


def resolve_kind(kind: str, n: int) -> str:
    """The index kind a gallery of n vectors is searched with."""
    if kind not in INDEX_CHOICES:
        raise UserError(f"`index` must be one of {', '.join(INDEX_CHOICES)}, got {kind!r}")
    if kind == "auto":
        return "flat" if n <= AUTO_EXACT else "hnsw"
    return "flat" if kind == "ivfpq" and n < IVFPQ_MIN else kind


def build(vectors: np.ndarray, ids: np.ndarray, kind: str):
    """A FAISS index of unit vectors (N, D) under int64 ids; kind as INDEX_KINDS (resolved)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    spec = INDEX_KINDS[kind]
    d, n = vectors.shape[1], len(vectors)
    index = faiss.index_factory(d, spec.factory(d, n), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(len(vectors), min(len(vectors), 256 * 256), replace=False)]
        index.train(sample)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    if spec.search_parameter:
        faiss.ParameterSpace().set_index_parameter(index, spec.search_parameter, spec.search_value)
    return index


def search(index, kind: str, queries: np.ndarray, k: int,
           vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, ids) of each query, best first; -1 ids where fewer exist. An index
    whose scores are approximate is asked for more candidates, and vectors(ids) scores them
    again exactly."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    if not INDEX_KINDS[kind].rescored or vectors is None:
        return index.search(queries, k)
    _, candidates = index.search(queries, min(index.ntotal, max(4 * k, 32)))
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for i, row in enumerate(candidates):
        found = row >= 0
        scores[i, found] = vectors(row[found]) @ queries[i]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, best = np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)
    return scores, np.where(np.isfinite(scores), best, -1)


def save(index, path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def load(path, kind: str):
    import faiss

    index = faiss.read_index(str(path))
    spec = INDEX_KINDS[kind]
    if spec.search_parameter:
        faiss.ParameterSpace().set_index_parameter(index, spec.search_parameter, spec.search_value)
    return index
