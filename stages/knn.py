"""Exact top-k inner-product search behind one function, for mining and dedup.

Backends: ``faiss`` (IndexFlatIP on CPU, or on GPU where faiss has GPU support), ``torch`` (chunked matmul +
topk: fp16/bf16 on CUDA, fp32 on CPU) and ``auto`` (the best available). The pool is searched in blocks of
``block_rows`` and the per-block top-k are merged, so a pool larger than memory can be streamed (pass an
iterable of blocks). Results are deterministic: ties are broken by the lower pool index.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np

Backend = Literal["auto", "faiss", "torch"]


def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Keep the k best of two candidate sets per query: score descending, then pool index ascending."""
    scores = np.concatenate([best_s, s], axis=1)
    index = np.concatenate([best_i, i], axis=1)
    missing = index < 0
    index_key = np.where(missing, np.iinfo(np.int64).max, index)
    order = np.lexsort((index_key, -np.where(missing, -np.inf, scores)), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(index, order, 1)


def _block_topk_faiss(queries: np.ndarray, block: np.ndarray, k: int, use_gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(block.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(block, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, block.shape[0]))
    return scores, ids.astype(np.int64)


def _block_topk_torch(queries, block: np.ndarray, k: int, device: str):
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pool = torch.as_tensor(np.asarray(block, dtype=np.float32), device=device).to(dtype)
    scores = queries @ pool.T
    top = torch.topk(scores.float(), min(k, pool.shape[0]), dim=1)
    return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)


def resolve_backend(backend: Backend) -> tuple[str, bool]:
    """(backend, on_gpu): faiss-gpu, then torch on CUDA, then faiss on CPU."""
    import torch

    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        if backend == "faiss":
            raise
    if backend == "faiss":
        return "faiss", faiss_gpus > 0
    if backend == "torch":
        return "torch", torch.cuda.is_available()
    if faiss_gpus > 0:
        return "faiss", True
    if torch.cuda.is_available():
        return "torch", True
    return "faiss", False


def knn_search(
    queries: np.ndarray,
    pool: np.ndarray | Iterable[np.ndarray],
    k: int,
    *,
    backend: Backend = "auto",
    block_rows: int = 262_144,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows by inner product (cosine for L2-normalised rows) for every query.

    ``pool`` is an array or an iterable of arrays (blocks streamed in order; indices count across blocks).
    Returns ``(scores, indices)`` of shape (queries, k), float32 and int64; where the pool has fewer than k
    rows the tail is ``-inf`` / ``-1``.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D array, got shape {queries.shape}")
    name, on_gpu = resolve_backend(backend)
    blocks = _blocks(pool, block_rows)
    n = queries.shape[0]
    best_s = np.full((n, k), -np.inf, np.float32)
    best_i = np.full((n, k), -1, np.int64)
    if name == "torch":
        import torch

        device = "cuda" if on_gpu else "cpu"
        q = torch.as_tensor(queries, device=device).to(torch.bfloat16 if on_gpu else torch.float32)
    offset = 0
    seen = 0
    for block in blocks:
        if block.shape[0] == 0:
            continue
        if block.shape[1] != queries.shape[1]:
            raise ValueError(f"pool dimension {block.shape[1]} differs from query dimension {queries.shape[1]}")
        if name == "torch":
            s, i = _block_topk_torch(q, block, k, device)
        else:
            s, i = _block_topk_faiss(queries, block, k, on_gpu)
        best_s, best_i = _merge(best_s, best_i, s, i + offset, k)
        offset += block.shape[0]
        seen += 1
    if seen == 0:
        raise ValueError("the pool is empty")
    return best_s, best_i


def _blocks(pool, block_rows: int):
    if isinstance(pool, np.ndarray):
        for start in range(0, pool.shape[0], block_rows):
            yield pool[start : start + block_rows]
    else:
        for block in pool:
            yield from _blocks(np.asarray(block), block_rows)
