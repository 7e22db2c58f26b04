"""`saferclip-data bench knn`: the exact top-k search against the bare matrix product and a naive torch loop.

Three figures per backend, all from the same run and data: seconds (best of the repeats), the time relative to
the bare product ``queries @ pool.T`` over the same data on the same device (1.0 = choosing the top k costs
nothing), and the speed-up over a naive loop (fp16 product of query chunks against pool blocks, ``torch.topk``
on each full score tile, merged by another top-k) — the way one writes it without thinking about tiles. The
results are checked against an exact fp32 reference computed with numpy on a sample of queries. On a GPU the
synthetic data are made and kept on the device, as the mining stage keeps its pool resident.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: the naive loop's tiles: query rows and pool rows per fp16 score tile
NAIVE_QUERY_ROWS = 16_384
NAIVE_BLOCK_ROWS = 262_144


@dataclass
class KnnRow:
    backend: str
    device: str
    seconds: float | None = None
    tflops: float | None = None
    matmul_seconds: float | None = None
    naive_seconds: float | None = None
    exact_rows: float | None = None  # share of sampled queries whose k indices equal the reference's, in order
    recall: float | None = None  # share of the reference's (query, neighbour) pairs found
    note: str = ""


def synthetic(rows: int, dim: int, seed: int, device: str):
    """Unit rows (normal directions); a torch tensor on ``device``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, device=device)
    return x / x.norm(dim=1, keepdim=True)


def best_seconds(repeats: int, fn: Callable[[], object], sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_only(q, pool, block_rows: int, fast) -> None:
    """The bare products of the same data (same dtype as the search's product), nothing kept."""
    qf = q.to(fast)
    for start in range(0, pool.shape[0], block_rows):
        qf @ pool[start : start + block_rows].to(fast).T


def naive_topk(q, pool, k: int, fast) -> tuple:
    """The straightforward loop: a full ``torch.topk`` over every score tile, candidates merged by top-k."""
    import torch

    out_s, out_i = [], []
    for qs in range(0, q.shape[0], NAIVE_QUERY_ROWS):
        qf = q[qs : qs + NAIVE_QUERY_ROWS].to(fast)
        cand_s, cand_i = [], []
        for ps in range(0, pool.shape[0], NAIVE_BLOCK_ROWS):
            top = torch.topk(qf @ pool[ps : ps + NAIVE_BLOCK_ROWS].to(fast).T, min(k, pool.shape[0] - ps), dim=1)
            cand_s.append(top.values.float())
            cand_i.append(top.indices + ps)
        s, i = torch.cat(cand_s, 1), torch.cat(cand_i, 1)
        best = torch.topk(s, k, dim=1)
        out_s.append(best.values)
        out_i.append(i.gather(1, best.indices))
    return torch.cat(out_s), torch.cat(out_i)


def reference_topk(queries: np.ndarray, pool: np.ndarray, k: int, chunk: int = 262_144) -> np.ndarray:
    """Exact fp32 top-k indices on the host CPU, the pool in chunks: each chunk's k best (torch's CPU matmul and
    top-k, on every core), then the candidates ordered by score and, on ties, by the lower index (numpy)."""
    import torch

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    q = torch.as_tensor(queries, dtype=torch.float32)
    for start in range(0, len(pool), chunk):
        block = torch.as_tensor(pool[start : start + chunk], dtype=torch.float32)
        top = torch.topk(q @ block.T, min(k, len(block)), dim=1)
        s_all = np.concatenate([best_s, top.values.numpy()], 1)
        i_all = np.concatenate([best_i, top.indices.numpy() + start], 1)
        order = np.lexsort((np.where(i_all < 0, np.iinfo(np.int64).max, i_all), -s_all), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s_all, order, 1), np.take_along_axis(i_all, order, 1)
    return best_i


def agreement(found: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(share of rows identical in order, share of reference pairs found)."""
    same_rows = float((found == reference).all(axis=1).mean())
    recall = float(np.mean([len(set(f) & set(r)) / len(r) for f, r in zip(found.tolist(), reference.tolist())]))
    return same_rows, recall


def run_knn_bench(pool_rows: int, query_rows: int, dim: int, k: int, backends: list[str], repeats: int = 3,
                  sample: int = 256, block_rows: int | None = None) -> list[KnnRow]:  # fmt: skip
    import torch

    from saferclip_data.stages.knn import knn_search, resolve_backend

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    fast = torch.float16 if on_gpu else torch.float32
    q, p = synthetic(query_rows, dim, 0, device), synthetic(pool_rows, dim, 1, device)
    q_host = q.cpu().numpy()
    picked = np.random.default_rng(0).choice(query_rows, min(sample, query_rows), replace=False)
    reference = reference_topk(q_host[picked], p.cpu().numpy(), k)
    flops = 2.0 * query_rows * pool_rows * dim
    where = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"

    matmul_only(q[:64], p, NAIVE_BLOCK_ROWS, fast)  # warm-up: CUDA context, cuBLAS
    matmul_s = best_seconds(repeats, lambda: matmul_only(q, p, NAIVE_BLOCK_ROWS, fast), sync)
    naive_topk(q[:64], p, k, fast)
    naive_s = best_seconds(repeats, lambda: naive_topk(q, p, k, fast), sync)
    found = naive_topk(q[torch.as_tensor(picked, device=device)], p, k, fast)[1].cpu().numpy()
    rows = [KnnRow("torch naive loop", where, naive_s, flops / naive_s / 1e12, matmul_s, naive_s,
                   *agreement(found, reference))]  # fmt: skip
    for name in backends:
        try:
            resolved, backend_gpu = resolve_backend(name)  # raises where the backend is missing
        except (ImportError, ValueError) as exc:
            rows.append(KnnRow(name, "-", note=f"unavailable: {exc}"))
            continue
        # faiss takes host arrays; the torch path searches the device-resident pool where it is
        pool = p if resolved == "torch" else p.cpu().numpy()
        search_q = q_host

        def search(queries=search_q, pool=pool, name=name):
            return knn_search(queries, pool, k, backend=name, block_rows=block_rows)

        search(q_host[:64])
        seconds = best_seconds(repeats, search, sync)
        found = knn_search(q_host[picked], pool, k, backend=name, block_rows=block_rows)[1]
        label = where if backend_gpu == on_gpu else ("cuda" if backend_gpu else "cpu")
        rows.append(KnnRow(f"{resolved} (saferclip)", label, seconds, flops / seconds / 1e12,
                           matmul_s, naive_s, *agreement(found, reference)))  # fmt: skip
    return rows
