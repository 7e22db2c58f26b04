"""`saferclip-data bench ...`: measured throughput of the heavy kernels, as ratios to a measured ceiling.

Performance claims live here, never in timed tests: each benchmark prints what it measured and the ceiling it
measured alongside (for kNN: the bare matrix product of the same shapes on the same device).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks that print measured throughput and ratios to a measured ceiling.")
console = Console(stderr=True)


def _synthetic(rows: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _matmul_ceiling(queries, pool, on_gpu: bool, block_rows: int) -> float:
    """Seconds for the bare products queries @ block.T over the same blocks (no top-k, no merge)."""
    import torch

    if on_gpu:
        q = torch.as_tensor(queries, device="cuda").to(torch.bfloat16)
        blocks = [
            torch.as_tensor(pool[s : s + block_rows], device="cuda").to(torch.bfloat16)
            for s in range(0, len(pool), block_rows)
        ]

        def run():
            for b in blocks:
                q @ b.T
            torch.cuda.synchronize()
    else:
        q = torch.as_tensor(queries)
        blocks = [torch.as_tensor(pool[s : s + block_rows]) for s in range(0, len(pool), block_rows)]

        def run():
            for b in blocks:
                q @ b.T

    run()
    return _best_of(3, run)


@bench_app.command(epilog="Example: saferclip-data bench knn --pool 200000 --queries 2000 --dim 768 --k 8")
def knn(
    pool: Annotated[int, typer.Option(min=1, help="Safe-pool rows (synthetic unit vectors).")] = 100_000,
    queries: Annotated[int, typer.Option(min=1, help="Query rows.")] = 1_000,
    dim: Annotated[int, typer.Option(min=1, help="Embedding width (768 = ViT-L/14).")] = 768,
    k: Annotated[int, typer.Option(min=1, help="Neighbours per query.")] = 8,
    block_rows: Annotated[int, typer.Option(min=1, help="Pool rows per search block.")] = 262_144,
    backends: Annotated[
        str, typer.Option(help="Comma-separated: faiss, torch (each on GPU where it can).")
    ] = "faiss,torch",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per backend; the best is reported.")] = 3,
) -> None:
    """Exact top-k search on a synthetic pool: queries/s, effective TFLOP/s (2*Q*P*D per search) and the time
    relative to the bare matrix product of the same shapes (1.0 = top-k and merging cost nothing)."""
    import torch

    from saferclip_data.stages.knn import knn_search, resolve_backend

    q = _synthetic(queries, dim, 0)
    p = _synthetic(pool, dim, 1)
    flops = 2.0 * queries * pool * dim
    table = Table(title=f"exact kNN: {queries:,} queries x {pool:,} pool x {dim} dims, k={k}")
    for column in ("backend", "device", "seconds", "queries/s", "eff. TFLOP/s", "matmul-only s", "time / matmul"):
        table.add_column(column, justify="right" if column != "backend" else "left")
    for name in [b.strip() for b in backends.split(",") if b.strip()]:
        try:
            resolved, on_gpu = resolve_backend(name)  # raises where the backend is missing
        except (ImportError, ValueError) as exc:
            table.add_row(name, "-", f"unavailable: {exc}", "", "", "", "")
            continue
        knn_search(q[: min(64, queries)], p[: min(4096, pool)], k, backend=name)  # warm-up (CUDA init, faiss)
        seconds = _best_of(repeats, lambda name=name: knn_search(q, p, k, backend=name, block_rows=block_rows))
        ceiling = _matmul_ceiling(q, p, on_gpu and torch.cuda.is_available(), block_rows)
        device = ("cuda" if on_gpu else "cpu") + (f" ({torch.get_num_threads()} threads)" if not on_gpu else "")
        table.add_row(
            resolved,
            device,
            f"{seconds:.3f}",
            f"{queries / seconds:,.0f}",
            f"{flops / seconds / 1e12:.3f}",
            f"{ceiling:.3f}",
            f"{seconds / ceiling:.2f}",
        )
    Console(width=max(Console().width, 110)).print(table)


@bench_app.command(epilog="Example: saferclip-data bench embed --model ViT-B-32 --images 20000 --batch-size 512")
def embed(
    model: Annotated[
        str, typer.Option(help="open_clip architecture, at random init (weights do not change cost).")
    ] = "ViT-B-32",
    images: Annotated[int, typer.Option(min=1, help="Synthetic JPEGs to embed.")] = 2048,
    image_px: Annotated[int, typer.Option(min=16, help="Side of the stored JPEGs (decoded and resized).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Embed batch size (512 on a big GPU).")] = 64,
    concurrency: Annotated[int, typer.Option(min=1, help="Embed workers (Ray actors).")] = 1,
    cpus: Annotated[
        float, typer.Option(min=0.1, help="CPU cores per worker (a Ray actor uses this many torch threads).")
    ] = 1.0,
    executors: Annotated[str, typer.Option(help="Comma-separated: local, ray.")] = "local,ray",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")] = "auto",
) -> None:
    """The embed stage end to end (WebDataset shards of JPEGs -> decode -> image and text embeddings -> parquet)
    against the image encoder alone on ready pixels: images/s of each and their ratio (1.0 = the pipeline costs
    nothing beyond the encoder)."""
    from saferclip_data.stages.bench_embed import run_bench

    names = [e.strip() for e in executors.split(",") if e.strip()]
    rows = run_bench(model, images, image_px, batch_size, concurrency, names, device, precision, cpus)
    table = Table(title=f"embed: {model}, {images:,} JPEGs of {image_px}px, batch {batch_size}")
    for column in ("path", "where", "images/s", "stage seconds", "ratio to encoder"):
        table.add_column(column, justify="left" if column in ("path", "where") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 110)).print(table)


@bench_app.command(epilog="Example: saferclip-data bench train --model ViT-B-32 --finetune lora --batch-size 48")
def train(
    model: Annotated[str, typer.Option(help="open_clip architecture, at random init.")] = "ViT-B-32",
    finetune: Annotated[str, typer.Option(help="lora or full.")] = "lora",
    batch_size: Annotated[int, typer.Option(min=1, help="Quadruplets per step.")] = 48,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after one counted and one warm-up step).")] = 5,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA), fp32 or bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    peak_tflops: Annotated[float | None, typer.Option(help="Peak TFLOP/s for MFU where the table lacks it.")] = None,
) -> None:
    """Trainer throughput on synthetic batches: samples/s, FLOPs per sample (counted by torch on one real step:
    trained and frozen encoders, loss, backward) and MFU against the device's dense bf16 peak."""
    from saferclip_data.training.bench_train import bench_train

    r = bench_train(model, finetune, batch_size, steps, precision, device, peak_tflops)
    table = Table(title=f"train step: {model}, {finetune}, batch {batch_size}")
    for column in ("device", "trainable params", "samples/s", "s/step", "GFLOP/sample", "TFLOP/s", "MFU"):
        table.add_column(column, justify="left" if column == "device" else "right")
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak known; --peak-tflops)"
    table.add_row(r["device"], f"{r['trainable_parameters']:,}", f"{r['samples_per_s']:,.1f}",
                  f"{r['step_seconds']:.3f}", f"{r['flops_per_sample'] / 1e9:,.1f}", f"{r['achieved_tflops']:.3f}",
                  mfu)  # fmt: skip
    Console(width=max(Console().width, 110)).print(table)
