"""Approximate top-k search with faiss inverted-file (IVF) indexes, for safe pools too large to scan per query.

An IVF index clusters the pool into ``nlist`` lists (k-means on a sample) and searches only the ``nprobe`` lists
nearest each query: work falls from P to about P * nprobe / nlist per query, at a recall that ``bench knn``
measures against the exact search. Two list encodings: ``ivf_flat`` keeps each vector in fp16 (2 bytes a
dimension, as the pool is stored), ``ivf_pq`` a product-quantised code (``pq_bytes`` a vector: a 1e8-row pool
fits one worker's memory). Either way the candidates are re-scored exactly (fp32 inner products with the stored
rows), so a reported similarity is always the true cosine and only the choice of candidates is approximate;
ties go to the lower pool row, as in the exact search.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

IndexKind = Literal["ivf_flat", "ivf_pq"]
#: candidates fetched per wanted neighbour before the exact re-scoring (PQ codes rank coarsely)
REFINE = {"ivf_flat": 2, "ivf_pq": 8}


def default_nlist(rows: int) -> int:
    """About 2 * sqrt(rows) lists (faiss suggests 1-16 * sqrt; fewer lists train faster on a CPU), at least 1, at
    most rows / 39 (k-means wants ~39 points a list)."""
    return max(1, min(int(2 * math.sqrt(rows)), rows // 39))


def build_ivf(blocks: Iterable[np.ndarray], sample: np.ndarray, kind: IndexKind, nlist: int, pq_bytes: int = 64,
              seed: int = 0) -> Any:  # fmt: skip
    """An IVF index trained on ``sample`` and filled from ``blocks`` (pool rows in order; ids are their global
    row numbers), on the CPU; :func:`search_ivf` moves it to a GPU where faiss has one."""
    import faiss

    dim = sample.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf_flat":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.by_residual = False  # each row kept as its own fp16 value, as the pool stores it (not a residual)
    elif kind == "ivf_pq":
        m = _pq_subquantizers(dim, pq_bytes)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown IVF index '{kind}' (ivf_flat, ivf_pq)")
    index.cp.seed = seed
    index.train(np.ascontiguousarray(sample, np.float32))
    start = 0
    for block in blocks:
        rows = np.ascontiguousarray(block, np.float32)
        index.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
        start += len(rows)
    return index


class IndexRows:
    """``rows[ids]`` from an IVF index's own stored vectors (exact for ivf_flat's fp16 lists), through a direct
    map made on first use (8 bytes a row)."""

    def __init__(self, index: Any):
        self.index = index
        self._mapped = False

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        if not self._mapped:
            self.index.make_direct_map()
            self._mapped = True
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))


def _pq_subquantizers(dim: int, pq_bytes: int) -> int:
    """The largest divisor of ``dim`` not above ``pq_bytes`` (one byte a sub-quantizer)."""
    return max(m for m in range(1, min(dim, pq_bytes) + 1) if dim % m == 0)


def search_ivf(index: Any, rows: Any, queries: np.ndarray, k: int, nprobe: int, kind: IndexKind):
    """Top-``k`` pool rows per query: IVF candidates (``REFINE[kind] * k``), re-scored exactly against ``rows``
    (the pool matrix, memory-mapped or in memory). Returns (scores, ids) like ``knn_search``: -inf / -1 past the
    candidates found."""
    queries = np.ascontiguousarray(queries, np.float32)
    index.nprobe = min(nprobe, index.nlist)
    wanted = min(index.ntotal, max(k, REFINE[kind] * k))
    _, ids = index.search(queries, wanted)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    out = np.full((len(queries), k), -1, np.int64)
    for q, cand in enumerate(ids):
        cand = np.unique(cand[cand >= 0])  # ascending row ids: a stable sort keeps ties at the lower row
        if not len(cand):
            continue
        exact = np.asarray(rows[cand], np.float32) @ queries[q]
        order = np.argsort(-exact, kind="stable")[:k]
        scores[q, : len(order)], out[q, : len(order)] = exact[order], cand[order]
    return scores, out
