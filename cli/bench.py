"""`saferclip-data bench ...`: measured throughput of the heavy kernels, as ratios to a measured ceiling.

Performance claims live here, never in timed tests: each benchmark prints what it measured and the ceiling it
measured alongside (for kNN: the bare matrix product of the same shapes on the same device).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from saferclip_data.models.clip import CompileMode
from saferclip_data.pipeline.errors import UserError

bench_app = typer.Typer(help="Benchmarks that print measured throughput and ratios to a measured ceiling.")
console = Console(stderr=True)


@bench_app.command(epilog="Example: saferclip-data bench knn --pool 4000000 --queries 100000 --dim 768 --k 16")
def knn(
    pool: Annotated[int, typer.Option(min=1, help="Safe-pool rows (synthetic unit vectors).")] = 100_000,
    queries: Annotated[int, typer.Option(min=1, help="Query rows.")] = 1_000,
    dim: Annotated[int, typer.Option(min=1, help="Embedding width (768 = ViT-L/14).")] = 768,
    k: Annotated[int, typer.Option(min=1, help="Neighbours per query.")] = 16,
    block_rows: Annotated[
        int | None, typer.Option(min=1, help="Pool rows per search block (default: planned from free memory).")
    ] = None,
    backends: Annotated[
        str, typer.Option(help="Comma-separated: faiss, torch (each on GPU where it can).")
    ] = "faiss,torch",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per backend; the best is reported.")] = 3,
    sample: Annotated[int, typer.Option(min=1, help="Queries checked against an exact fp32 numpy reference.")] = 256,
) -> None:
    """Exact top-k search on a synthetic pool: seconds, queries/s, effective TFLOP/s (2*Q*P*D per search), the
    time relative to the bare matrix product of the same shapes (1.0 = top-k and merging cost nothing), the
    speed-up over a naive torch loop, and agreement with an exact fp32 reference on a sample of queries."""
    from saferclip_data.bench.knn import run_knn_bench

    names = [b.strip() for b in backends.split(",") if b.strip()]
    rows = run_knn_bench(pool, queries, dim, k, names, repeats, sample, block_rows)
    table = Table(title=f"exact kNN: {queries:,} queries x {pool:,} pool x {dim} dims, k={k}")
    columns = ("backend", "device", "seconds", "queries/s", "eff. TFLOP/s", "time / matmul", "x naive",
               "exact rows", "recall")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("backend", "device") else "right")
    for r in rows:
        if r.seconds is None:
            table.add_row(r.backend, r.device, r.note, *[""] * (len(columns) - 3))
            continue
        table.add_row(r.backend, r.device, f"{r.seconds:.3f}", f"{queries / r.seconds:,.0f}", f"{r.tflops:.3f}",
                      f"{r.seconds / r.matmul_seconds:.2f}", f"{r.naive_seconds / r.seconds:.2f}",
                      f"{r.exact_rows:.3f}", f"{r.recall:.4f}")  # fmt: skip
    Console(width=max(Console().width, 150)).print(table)


def _gpu_share(value: str) -> str:
    if value != "auto":
        try:
            if float(value) < 0:
                raise ValueError
        except ValueError:
            raise typer.BadParameter(f"'{value}' is not auto or a non-negative number") from None
    return value


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
    gpus: Annotated[
        str,
        typer.Option(
            help="GPUs per worker: auto (one where there are GPUs), or a share such as 0.5.", callback=_gpu_share
        ),
    ] = "auto",
    executors: Annotated[str, typer.Option(help="Comma-separated: local, ray.")] = "local,ray",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")] = "auto",
    decoder: Annotated[
        Literal["pil", "tensor"] | None,
        typer.Option(help="pil or tensor (batched, on the device); default: the stage's choice."),
    ] = None,
    compile_mode: Annotated[
        CompileMode | None,
        typer.Option(
            "--compile",
            help="torch.compile mode for the image tower, in the stage and the ceiling alike: default, "
            "reduce-overhead (CUDA graphs) or max-autotune; default: eager.",
        ),
    ] = None,
) -> None:
    """The embed stage end to end (WebDataset shards of JPEGs -> decode -> image and text embeddings -> parquet)
    against the image encoder alone on ready pixels: images/s of each, their ratio (1.0 = the pipeline costs
    nothing beyond the encoder) and, for Ray, the ratio to the same stage in-process. The stage is timed from its
    first shard's start to its last shard's output on disk; in brackets, the whole stage with the workers'
    set-up (Ray actors, model loading, compiling), which a long build pays once. The "per batch" rows time the
    worker's other per-batch work, one batch at a time: the text tower on trimmed captions, tokenising, JPEG
    bytes to pixels. The device work adds to the image tower's; host work below 1 cannot hide behind it."""
    from saferclip_data.bench.embed import EmbedRun, run_bench

    names = [e.strip() for e in executors.split(",") if e.strip()]
    run = EmbedRun(batch_size, concurrency, cpus, gpus if gpus == "auto" else float(gpus), device, precision, decoder,
                   compile_mode)  # fmt: skip
    rows = run_bench(model, images, image_px, names, run)
    table = Table(title=f"embed: {model}, {images:,} JPEGs of {image_px}px, batch {batch_size}")
    for column in ("path", "where", "images/s", "seconds (with set-up)", "ratio to encoder", "ray / local"):
        table.add_column(column, justify="left" if column in ("path", "where") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 150)).print(table)


@bench_app.command(epilog="Example: saferclip-data bench train --model ViT-B-32 --finetune lora --batch-size 48")
def train(
    model: Annotated[str, typer.Option(help="open_clip architecture, at random init.")] = "ViT-B-32",
    finetune: Annotated[str, typer.Option(help="lora or full.")] = "lora",
    batch_size: Annotated[int, typer.Option(min=1, help="Quadruplets per step.")] = 48,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after one counted and one warm-up step).")] = 5,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA), fp32 or bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    peak_tflops: Annotated[float | None, typer.Option(help="Peak TFLOP/s for MFU where the table lacks it.")] = None,
    loader_workers: Annotated[
        int | None, typer.Option(min=0, help="Also time the data loader with this many processes (default: as train).")
    ] = None,
    loader: Annotated[bool, typer.Option(help="Time the data loader too (synthetic quadruplet shards).")] = True,
    reference_precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        typer.Option("--reference", help="Frozen reference weights: auto (bf16 when the step is bf16), fp32 or bf16."),
    ] = "auto",
    compile_mode: Annotated[
        CompileMode | None,
        typer.Option(
            "--compile",
            help="torch.compile the towers (reference; trained ones without LoRA) as training.compile does: "
            "default, reduce-overhead (CUDA graphs) or max-autotune; compiling is not timed; default: eager.",
        ),
    ] = None,
) -> None:
    """Trainer throughput on synthetic batches: samples/s, FLOPs per sample (counted by torch on one real step:
    trained and frozen encoders, loss, backward) and MFU against the device's dense bf16 peak; then the samples/s
    the real data path (tars, JPEG decoding, preprocessing, tokenising) delivers, and its ratio to the step's
    (>= 1: loading keeps up), and the rate at which one DataLoader worker of 8 reads the whole epoch stream (each
    does, keeping its share; under DDP a rank gets at most that divided by the number of ranks)."""
    from saferclip_data.bench.train import bench_train, loader_figures

    r = bench_train(model, finetune, batch_size, steps, precision, device, peak_tflops, reference_precision,
                    compile_mode)  # fmt: skip
    compiled = f", compiled ({compile_mode})" if compile_mode else ""
    table = Table(
        title=f"train step: {model}, {finetune}, batch {batch_size}, reference weights {r['reference']}{compiled}"
    )
    columns = ("device", "trainable params", "samples/s", "s/step", "GFLOP/sample", "TFLOP/s", "MFU", "loader",
               "loader / step")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "device" else "right")
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak known; --peak-tflops)"
    load, ratio = "-", "-"
    if loader:
        load, ratio = loader_figures(model, batch_size, device, loader_workers, r["samples_per_s"])
    table.add_row(r["device"], f"{r['trainable_parameters']:,}", f"{r['samples_per_s']:,.1f}",
                  f"{r['step_seconds']:.3f}", f"{r['flops_per_sample'] / 1e9:,.1f}", f"{r['achieved_tflops']:.3f}",
                  mfu, load, ratio)  # fmt: skip
    Console(width=max(Console().width, 140)).print(table)


@bench_app.command(epilog="Example (on a GPU machine): saferclip-data bench suite --out /tmp/bench")
def suite(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for results.json and results.md (default: saferclip-bench-suite in the temp dir).",
            show_default=False,
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Toy shapes: checks the suite itself in about 15 s on a CPU.")] = False,
    part: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only the parts whose names contain this (repeatable), adding their figures to the results "
            "already in --out: a short GPU session can run the suite in several calls, or redo one part."
        ),
    ] = None,
    list_parts: Annotated[bool, typer.Option("--list", help="Print the parts' names, in order, and exit.")] = False,
) -> None:
    """Every GPU throughput benchmark in one run: kNN 100k x 4M x 768 (k=16), the embed stage for ViT-L/14 and
    ViT-B/32 (in-process, through Ray, two actors per GPU), the trainer (ViT-B/32 and ViT-L/14, LoRA and full).
    Writes results.json and results.md after every part, each figure marked against its target; a part
    that fails is recorded and the others still run."""
    from saferclip_data.bench.suite import default_out, part_name, run_suite, selected_parts

    try:
        chosen = selected_parts(part, quick)
    except ValueError as error:
        raise UserError(str(error)) from None
    if list_parts:
        for spec in chosen:
            console.print(part_name(spec))
        return
    from saferclip_data.bench.suite import has_cuda

    if not quick and not has_cuda():
        raise UserError(
            "bench suite: its shapes are sized for a GPU (kNN 100k x 4M x 768, ViT-L/14 training) and this "
            "machine has no CUDA device; run it with --quick to check the suite itself on a CPU"
        )
    folder = out or default_out()
    results = run_suite(folder, quick=quick, log=lambda line: console.print(line), parts=part)
    table = Table(title=f"bench suite on {results.machine['device']}")
    for column in ("figure", "value", "target", "pass"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, v in results.verdicts().items():
        value = "not measured" if v["value"] is None else f"{v['value']:,.3f}"
        table.add_row(name, value, v["target"], "-" if v["pass"] is None else str(v["pass"]))
    Console(width=max(Console().width, 110)).print(table)
    console.print(
        f"results: {folder / 'results.md'} and results.json; failed parts: {sorted(results.errors) or 'none'}"
    )


@bench_app.command(epilog="Example: saferclip-data bench scale --sizes 250000,500000,1000000,2000000 --dim 512")
def scale(
    sizes: Annotated[str, typer.Option(help="Comma-separated record counts.")] = "50000,100000,200000",
    dim: Annotated[
        int, typer.Option(help="Embedding width: 512 (ViT-B/32 names the model), 384 (ViT-S/32) or 128 (toy).")
    ] = 512,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for pools, work dirs and scale.json (default: saferclip-scale in the temp dir).",
            show_default=False,
        ),
    ] = None,
    exact_dedup_max: Annotated[
        int,
        typer.Option(
            min=0,
            help="Up to this size, also run exact all-pairs dedup (its recall) and mine with "
            "the other neighbours index (IVF where the build searched exactly: its precision@1).",
        ),
    ] = 200_000,
    exact_sample: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also search this many sampled unsafe queries exactly over the build's safe pool: the mining "
            "precision@1 the build's own search is compared with (0: skip).",
        ),
    ] = 3_000,
    edit_noise: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Noise of a planted unsafe edit around its safe source (0.6: cosine ~0.85 to it); larger values "
            "make the nearest safe target harder to find for an approximate index.",
        ),
    ] = 0.6,
    cluster_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Records per cluster of the synthetic pool: small clusters (e.g. 40) spread the pool evenly, "
            "where inverted lists cut through neighbourhoods and an approximate search misses most.",
        ),
    ] = 2_000,
    images: Annotated[
        bool,
        typer.Option(
            help="Give every record an image URL on a loopback server (one placeholder JPEG), so the shards stage "
            "fetches the selected records' images with img2dataset and writes the plain view too.",
        ),
    ] = False,
    keep: Annotated[bool, typer.Option(help="Keep each size's pool and work dir (they take disk).")] = False,
    executor: Annotated[
        Literal["ray", "local"], typer.Option(help="ray: an embedded Ray, workers in processes of their own.")
    ] = "ray",
) -> None:
    """Build a synthetic LAION-layout pool of each size from precomputed embeddings through shards (one child
    build per size) and print, per stage, seconds, the largest process's peak RSS, records/s; the
    planted truth (dedup recall of planted copies, mining precision@1 of planted unsafe->safe edits, dedup recall
    against exact all-pairs where feasible); and each stage's growth exponent in time and memory."""
    import tempfile

    from saferclip_data.bench.scale import ARCH_OF_DIM
    from saferclip_data.bench.scale_report import report, run_sizes

    try:
        counts = [int(s.replace("_", "")) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated record counts, got '{sizes}'") from None
    if not counts or min(counts) < 1_000:
        raise UserError("--sizes: give one or more record counts of at least 1,000")
    if dim not in ARCH_OF_DIM:
        raise UserError(f"--dim: 512 (ViT-B/32), 384 (ViT-S/32) or 128 (the toy model), not {dim}")
    folder = out or Path(tempfile.gettempdir()) / "saferclip-scale"
    report(run_sizes(counts, dim, folder, exact_dedup_max, executor, exact_sample, images, edit_noise, cluster_size,
                     keep, lambda line: console.print(line)), folder, executor, console)  # fmt: skip


@bench_app.command(epilog="Example: saferclip-data bench classifiers --model ViT-B-32")
def classifiers(
    model: Annotated[
        str, typer.Option(help="open_clip architecture whose image tower the classifier's cost is set against.")
    ] = "ViT-B-32",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the photo manifest and work dir (default: a temp folder).", show_default=False),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each; the best is reported.")] = 3,
) -> None:
    """OpenNSFW on the real photographs that ship inside installed packages (all safe): built through source ->
    embed -> score like any data, it reports what was kept or rejected (with reasons), each photograph's score,
    the false-positive rate at the classifier's threshold (0.8), and its CPU milliseconds per image against
    MODEL's image tower on the same photographs and threads."""
    import tempfile

    from saferclip_data.bench.classifiers import run_and_report

    folder = out or Path(tempfile.mkdtemp(prefix="saferclip-photos-"))
    try:
        run_and_report(model, folder, repeats, console)
    except RuntimeError as error:
        raise UserError(f"bench classifiers: {error}") from None


@bench_app.command(epilog="Example: saferclip-data bench kills recipes/demo.yaml --trials 10")
def kills(
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe to build (default: the demo).", show_default=False)
    ] = None,
    trials: Annotated[int, typer.Option(min=1, help="Builds killed (kill -9) at a random moment, then resumed.")] = 10,
    out: Annotated[
        str | None,
        typer.Option(help="Folder for the work dirs and kills.json (default: saferclip-kills in the temp dir), or "
                     "a bucket URL (s3://bucket/kills) to kill builds whose work dir is in the bucket.",
                     show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the kill moments.")] = 0,
    executor: Annotated[Literal["ray", "local"], typer.Option(help="ray: the embedded Ray.")] = "ray",
) -> None:
    """Crash safety, measured: a clean build of RECIPE, then TRIALS builds each killed with SIGKILL inside one
    stage (the stages in turn, at a random share of the time the stage took in the clean build), checked 15 s
    later for processes the build left alive, resumed to the end and compared with the clean build file by file
    (every data file: parquet, tar, npy, json; markers, manifests, task logs and the report, which state when
    and where they ran, left out)."""
    import json
    import tempfile

    from saferclip_data.bench.kills import print_results, run
    from saferclip_data.cli.common import default_recipe
    from saferclip_data.pipeline import storage

    remote = out is not None and storage.is_url(out)
    folder = Path(tempfile.gettempdir()) / "saferclip-kills" if out is None or remote else Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    seconds, results = run((recipe or default_recipe()).resolve(), out if remote else str(folder), trials, seed,
                           executor, folder / "views")  # fmt: skip
    (folder / "kills.json").write_text(json.dumps({"clean_seconds": seconds, "trials": results}, indent=2) + "\n")
    print_results(seconds, results, executor, console)
    console.print(f"results: {folder / 'kills.json'}")


@bench_app.command(name="same-output", epilog="Example: saferclip-data bench same-output /tmp/work-old /tmp/work-new")
def same_output(
    first: Annotated[str, typer.Argument(help="A finished work dir (a folder or a bucket URL).")],
    second: Annotated[str, typer.Argument(help="Another build of the same recipe.")],
    tolerance: Annotated[float, typer.Option(help="Largest float difference that still counts as the same.")] = 1e-6,
) -> None:
    """Compare two builds of one recipe, stage by stage: data files byte-identical, or else the same records by
    key with the same values (floats within TOLERANCE; tar samples by key, whichever tar holds them). Exits 1
    when anything differs. Markers, manifests, task logs and the report are left out."""
    import tempfile

    from saferclip_data.bench.same_output import compare_builds, print_comparison
    from saferclip_data.pipeline import mirror, storage

    views = Path(tempfile.mkdtemp(prefix="saferclip-same-output-"))
    folders = []
    for index, location in enumerate((first, second)):
        if not storage.is_url(location) and not Path(location).is_dir():
            raise UserError(f"bench same-output: no work dir at {location}")
        folders.append(mirror.copy_folder(location, views / str(index)))  # a bucket's: compared as a local copy
    rows = compare_builds(folders[0], folders[1], tolerance)
    shutil.rmtree(views, ignore_errors=True)
    print_comparison(rows, f"{first} vs {second}")
    if any(r["differ"] for r in rows):
        raise typer.Exit(1)
