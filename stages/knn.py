"""Exact top-k inner-product search behind one function, for mining, dedup and benchmark selection, and the
spherical k-means that partitions (dedup) and IVF lists (neighbours) are trained with.

Backends: ``faiss`` (IndexFlatIP on the CPU, or on the GPU where faiss has GPU support), ``torch`` (tiled
matmul + top-k, on CUDA where there is one) and ``auto`` (the best available). Results are exact and
deterministic whatever the backend or tiling: scores are fp32 inner products, ties go to the lower pool index.

The torch path is built for a GPU: queries are uploaded once, the pool is searched block by block (a pool
larger than memory can be streamed as an iterable of blocks; a torch tensor already on the GPU stays there),
and every block is searched in query tiles sized to the free memory. On CUDA the product runs in fp16 on the
tensor cores; candidates are picked from it with a margin (``RERANK_MARGIN`` beyond k) by a group-max
pre-selection (one cheap pass over the score tile, instead of a full top-k over it) and re-scored in fp32
from the fp32 rows, so the fp16 rounding never reaches the results. The running best lists are merged on the
device; only the final (queries, k) arrays come back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Backend = Literal["auto", "faiss", "torch"]

#: candidates kept beyond k per block and re-scored in fp32: on CUDA the true k-th neighbour is lost only if more
#: than this many rows overtake it by fp16 rounding (about 1e-3 on a cosine); on either device it is how many
#: exact ties at the k-th place still go to the lower pool index
RERANK_MARGIN = 16
#: score-tile columns reduced to one maximum in the pre-selection
GROUP = 64


#: the distributions that install the one ``faiss/`` package (each overwrites the other's files)
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cu13", "faiss-cuda")


def faiss_install_problem() -> str | None:
    """One line naming a double faiss install (a CPU and a GPU wheel share the ``faiss/`` folder: upgrading or
    removing either breaks the import), with the command that leaves one; None where there is one or none."""
    from importlib import metadata

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if len(found) < 2:
        return None
    names = " ".join(f.split()[0] for f in found)
    return (f"faiss is installed twice ({', '.join(found)}) and both write the same faiss/ folder; keep one: "
            f"pip uninstall -y {names} && pip install faiss-gpu-cu12 (GPU) or faiss-cpu")  # fmt: skip


def _block_topk_faiss(queries: np.ndarray, block: np.ndarray, k: int, use_gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(block.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(block, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, block.shape[0]))
    return scores, ids.astype(np.int64)


def resolve_backend(backend: Backend) -> tuple[str, bool]:
    """(backend, on_gpu): faiss-gpu, then torch on CUDA, then faiss on CPU."""
    import torch

    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown kNN backend '{backend}' (auto, faiss, torch)")
    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        if backend == "faiss":
            raise
        if backend == "auto" and not torch.cuda.is_available():
            return "torch", False
    if backend == "faiss":
        return "faiss", faiss_gpus > 0
    if backend == "torch":
        return "torch", torch.cuda.is_available()
    if faiss_gpus > 0:
        return "faiss", True
    if torch.cuda.is_available():
        return "torch", True
    return "faiss", False


@dataclass(frozen=True)
class Tiles:
    """How the torch search cuts its work: pool rows per uploaded block, query rows per score tile."""

    block_rows: int
    query_rows: int


def plan_tiles(dim: int, on_gpu: bool, free_bytes: int | None = None, block_rows: int | None = None) -> Tiles:
    """Tile sizes from the memory there is: on a GPU a block (fp32 rows + fp16 copy) takes at most a quarter of
    the free memory and a score tile (fp16, plus its group maxima) about an eighth; on the CPU a score tile is
    1 GiB of fp32 (tile shapes measured there within noise of each other, big ones a little ahead)."""
    if not on_gpu:
        block = block_rows or 262_144
        return Tiles(block, max(64, (1 << 30) // (4 * block)))
    free = free_bytes if free_bytes is not None else 8 << 30
    block = block_rows or max(GROUP, min(1 << 21, free // 4 // (6 * dim)) // GROUP * GROUP)
    return Tiles(block, int(max(256, min(16_384, free // 8 // (2 * block)))))


def _device_blocks(pool: Any, rows: int, device: Any) -> Iterator[Any]:
    """fp32 pool blocks on ``device``: slices of a resident tensor, or uploads of host arrays."""
    import torch

    if isinstance(pool, torch.Tensor):
        pool = pool.to(device)
        for start in range(0, pool.shape[0], rows):
            yield pool[start : start + rows].float()
        return
    for block in _blocks(pool, rows):
        yield torch.as_tensor(np.ascontiguousarray(block, dtype=np.float32)).to(device, non_blocking=True)


def _candidates(scores: Any, count: int) -> Any:
    """Column indices of the ``count`` largest entries of each score row. With many columns, whole groups of
    GROUP columns are ranked by their maximum first: every one of the top ``count`` lies in one of the top
    ``count`` groups, so a full top-k over the tile is replaced by a max pass and two small top-ks."""
    import torch

    rows, cols = scores.shape
    count = min(count, cols)
    groups = cols // GROUP
    if groups <= 2 * count or cols % GROUP:
        return torch.topk(scores, count, dim=1, sorted=False).indices
    grouped = scores.view(rows, groups, GROUP)
    top_groups = torch.topk(grouped.amax(dim=2), count, dim=1, sorted=False).indices
    members = grouped.gather(1, top_groups[:, :, None].expand(-1, -1, GROUP)).reshape(rows, count * GROUP)
    within = torch.topk(members, count, dim=1, sorted=False).indices
    return top_groups.gather(1, within // GROUP) * GROUP + within % GROUP


def _merge_device(best_s, best_i, s, i, k: int):
    """The k best of both per row (on the tensors' device): score descending, then pool index ascending (two stable
    sorts make the lexicographic order), missing entries (-1) last."""
    import torch

    scores = torch.cat([best_s, s], dim=1)
    index = torch.cat([best_i, i], dim=1)
    key = torch.where(index < 0, torch.iinfo(torch.int64).max, index)
    by_index = torch.sort(key, dim=1, stable=True).indices
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), index.gather(1, by_score)


def _torch_search(queries: np.ndarray, pool: Any, k: int, on_gpu: bool, block_rows: int | None,
                  query_rows: int | None) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    import torch

    device = torch.device("cuda" if on_gpu else "cpu")
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    tiles = plan_tiles(queries.shape[1], on_gpu, free, block_rows)
    q_rows = query_rows or tiles.query_rows
    fast = torch.float16 if on_gpu else torch.float32
    q32 = torch.as_tensor(queries).to(device)
    q_fast = q32.to(fast)
    n = queries.shape[0]
    best_s = torch.full((n, k), -torch.inf, device=device)
    best_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
    offset, seen = 0, 0
    with torch.no_grad():
        for block in _device_blocks(pool, tiles.block_rows, device):
            if block.shape[0] == 0:
                continue
            _check_width(block, queries)
            block_fast = block.to(fast)
            count = k + RERANK_MARGIN
            for start in range(0, n, q_rows):
                stop = min(n, start + q_rows)
                scores = q_fast[start:stop] @ block_fast.T
                cols = _candidates(scores, count)
                if on_gpu:  # exact fp32 scores of the fp16 candidates
                    exact = torch.einsum("qd,qcd->qc", q32[start:stop], block[cols])
                else:  # the product already was fp32
                    exact = scores.gather(1, cols)
                best_s[start:stop], best_i[start:stop] = _merge_device(
                    best_s[start:stop], best_i[start:stop], exact, cols + offset, k
                )
            offset += block.shape[0]
            seen += 1
    return best_s.cpu().numpy(), best_i.cpu().numpy(), seen


def knn_search(
    queries: np.ndarray,
    pool: Any,
    k: int,
    *,
    backend: Backend = "auto",
    block_rows: int | None = None,
    query_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows by inner product (cosine for L2-normalised rows) for every query.

    ``pool`` is an array, a torch tensor (a GPU-resident one is searched where it is), or an iterable of
    arrays (blocks streamed in order; indices count across blocks). ``block_rows``/``query_rows`` override the
    tile sizes planned from the free memory. Returns ``(scores, indices)`` of shape (queries, k), float32 and
    int64; where the pool has fewer than k rows the tail is ``-inf`` / ``-1``.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D array, got shape {queries.shape}")
    name, on_gpu = resolve_backend(backend)
    if name == "torch":
        best_s, best_i, seen = _torch_search(queries, pool, k, on_gpu, block_rows, query_rows)
    else:
        best_s, best_i, seen = _faiss_search(queries, pool, k, on_gpu, block_rows or 262_144)
    if seen == 0:
        raise ValueError("the pool is empty")
    return best_s, best_i


def _faiss_search(queries: np.ndarray, pool: Any, k: int, on_gpu: bool, block_rows: int):
    import torch

    n = queries.shape[0]
    best_s = torch.full((n, k), -torch.inf)
    best_i = torch.full((n, k), -1, dtype=torch.int64)
    offset, seen = 0, 0
    if not isinstance(pool, np.ndarray) and hasattr(pool, "cpu"):  # a torch tensor
        pool = pool.float().cpu().numpy()
    for block in _blocks(pool, block_rows):
        if block.shape[0] == 0:
            continue
        _check_width(block, queries)
        s, i = _block_topk_faiss(queries, block, k, on_gpu)
        best_s, best_i = _merge_device(best_s, best_i, torch.from_numpy(s), torch.from_numpy(i) + offset, k)
        offset += block.shape[0]
        seen += 1
    return best_s.numpy(), best_i.numpy(), seen


def _check_width(block: Any, queries: np.ndarray) -> None:
    if block.shape[1] != queries.shape[1]:
        raise ValueError(f"pool dimension {block.shape[1]} differs from query dimension {queries.shape[1]}")


def _blocks(pool: np.ndarray | Iterable[np.ndarray], block_rows: int) -> Iterator[np.ndarray]:
    if isinstance(pool, np.ndarray):
        for start in range(0, pool.shape[0], block_rows):
            yield pool[start : start + block_rows]
    else:
        for block in pool:
            yield from _blocks(np.asarray(block), block_rows)


def train_centroids(sample: np.ndarray, partitions: int, seed: int, iterations: int) -> np.ndarray:
    """Spherical k-means centroids (faiss), unit rows; fewer partitions when the sample is small."""
    import faiss

    k = max(1, min(partitions, len(sample) // 4))
    if k == 1:
        centroid = sample.mean(axis=0, keepdims=True) if len(sample) else np.ones((1, sample.shape[1]), np.float32)
        return (centroid / max(float(np.linalg.norm(centroid)), 1e-12)).astype(np.float32)
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(len(sample) / k)))  # fmt: skip
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(kmeans.centroids, np.float32)
