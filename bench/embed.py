"""`saferclip-data bench embed`: the embed stage end to end against the bare image encoder.

The ceiling is the image tower alone on already-preprocessed pixels, at the stage's device, precision and
batch size, with the model at random init (weights do not change the cost). End to end is a real ``build`` of
a source + embed recipe over WebDataset shards of synthetic JPEGs, run as a subprocess per executor, timed by
the embed stage's shard markers from the first shard's start to the last shard's output on disk (worker set-up
excluded: Ray actors, model loading, compiling; reading, decoding, text embedding and writing included). The
ratio of the two should be ≥ 0.9 (the stage keeps the GPU busy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


def synthetic_shards(folder: Path, images: int, size: int, per_tar: int = 8192, seed: int = 0,
                     distinct: int = 512) -> Path:  # fmt: skip
    """JPEG photo-like noise (smooth gradients + noise, so the codec has work) with alt-text-length captions.
    ``distinct`` pictures are encoded and reused in turn (decoding costs the same; encoding 50k would not).
    A tar is a shard of the build; tars are as large as img2dataset writes them (10k samples): 8192 = 16
    batches of 512."""
    import webdataset as wds

    from saferclip_data.bench.train import noise_jpegs, synthetic_captions

    folder.mkdir(parents=True, exist_ok=True)
    jpegs = noise_jpegs(min(images, distinct), size, seed)
    captions = synthetic_captions(images, seed)
    for start in range(0, images, per_tar):
        with wds.TarWriter(str(folder / f"bench-{start // per_tar:05d}.tar")) as writer:
            for i in range(start, min(images, start + per_tar)):
                writer.write({"__key__": f"img{i:07d}", "jpg": jpegs[i % len(jpegs)], "txt": captions[i]})
    return folder


def encoder_ceiling(arch: str, batch_size: int, images: int, device: str, precision: str,
                    compile_mode: str | None = None) -> tuple[float, str, int, float]:  # fmt: skip
    """(images/s of the image tower alone, device description, input size, captions/s of the text tower) on
    random pixels of that size and alt-text captions cut as the stage cuts them; the image tower compiled with
    ``compile_mode`` when the stage is, so that the ratio compares like with like."""
    import torch

    from saferclip_data.bench.train import synthetic_captions
    from saferclip_data.models.clip import encode_text, trim_tokens
    from saferclip_data.stages.embed import ModelConfig, image_encoder, load_worker_model

    clip, model, dev, dtype = load_worker_model(ModelConfig(arch=arch), device, precision, "bench")
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pixels = torch.randn(batch_size, 3, size, size, device=dev, dtype=dtype)
    batches = max(1, images // batch_size)
    encode = image_encoder(model, compile_mode)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(batches):
                encode(pixels)
        if dev == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up: kernels, allocator
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    where = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    tokens = trim_tokens(model, clip.tokenizer(synthetic_captions(batch_size, seed=2))).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.inference_mode():
        text_rate = _rate(lambda: encode_text(model, tokens), batch_size, sync)
    return batches * batch_size / seconds, f"{where}, {dtype}".replace("torch.", ""), size, text_rate


def _rate(work, items: int, sync=lambda: None, repeats: int = 3) -> float:
    """Items/s of the best of ``repeats`` timed calls, after one warm-up call."""
    from saferclip_data.bench.knn import best_seconds

    work()
    sync()
    return items / best_seconds(repeats, work, sync)


def host_work_rates(arch: str, image_size: int, batch_size: int, image_px: int,
                    device: str) -> list[tuple[str, str, float]]:  # fmt: skip
    """Items/s of each piece of per-batch work an embed worker does besides the encoders, one batch at a time:
    tokenising (open_clip's tokenizer, and the cached front the stage uses) and turning a batch of JPEG bytes
    into model-ready pixels with the tensor decoder on ``device`` (nvJPEG on CUDA). Set against the encoder's
    images/s they say which one a worker cannot hide: the slowest one bounds a single worker."""
    import open_clip
    import pyarrow as pa
    import torch

    from saferclip_data.bench.train import noise_jpegs, synthetic_captions
    from saferclip_data.models.clip import register_toy_configs
    from saferclip_data.models.decode import byte_views, decode_tensors
    from saferclip_data.models.tokens import fast_tokenizer

    register_toy_configs()
    captions = synthetic_captions(batch_size, seed=1)
    base = open_clip.get_tokenizer(arch)
    cached = fast_tokenizer(base)  # the front only reads the base tokenizer: both time the same vocabulary
    jpegs = noise_jpegs(min(batch_size, 64), image_px)
    column = pa.chunked_array([pa.array([jpegs[i % len(jpegs)] for i in range(batch_size)], pa.binary())])
    dev = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    mean = torch.zeros(1, 3, 1, 1, device=dev)
    std = torch.ones(1, 3, 1, 1, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    decoder_where = "cuda, nvJPEG" if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return [
        ("tokenise (open_clip)", "1 thread, captions/s", _rate(lambda: base(captions), batch_size)),
        ("tokenise (cached, used)", "1 thread, captions/s", _rate(lambda: cached(captions), batch_size)),
        ("JPEG to pixels", f"tensor decoder, {decoder_where}",
         _rate(lambda: decode_tensors(byte_views(column), image_size, mean, std, dev), batch_size, sync)),
    ]  # fmt: skip


@dataclass
class EmbedRun:
    """How the embed stage runs in the benchmark (the stage's own settings)."""

    batch_size: int = 512
    concurrency: int = 1  # workers (Ray actors; the local executor runs one)
    cpus: float = 1.0  # CPU cores per worker
    gpus: float | str = "auto"  # GPUs per worker: 0.5 puts two actors on one GPU
    device: str = "auto"
    precision: str = "auto"
    decoder: str | None = None  # None: the stage's default
    compile: str | None = None  # torch.compile mode of the image tower (stage and ceiling); None: eager


def end_to_end(shards: Path, work: Path, arch: str, executor: str, run: EmbedRun) -> dict:
    """Build source + embed over the shards with ``executor``: records, and seconds from the first shard's start
    to the last shard's output on disk (worker set-up — Ray actors, model loading, compiling — is left out, as
    it is from the ceiling; it is paid once per build), next to the whole stage's seconds."""
    embed = {"batch_size": run.batch_size, "concurrency": run.concurrency, "device": run.device,
             "precision": run.precision, "cpus": run.cpus, "gpus": run.gpus}  # fmt: skip
    for option in ("decoder", "compile"):
        if getattr(run, option) is not None:
            embed[option] = getattr(run, option)
    recipe = {
        "name": "bench",
        "source": {"kind": "webdataset", "path": str(shards)},
        "model": {"arch": arch, "pretrained": None, "init_seed": 0},
        "stages": {"embed": embed},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "saferclip_data.cli.main", "build", str(path), "-w", str(work / "w"),
           "--executor", executor, "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{executor} build failed: {proc.stderr.strip().splitlines()[-1:]}")
    manifest = json.loads((work / "w" / "embed" / "_manifest.json").read_text())
    markers = [json.loads((work / "w" / "embed" / f"{shard}.done.json").read_text()) for shard in manifest["shards"]]
    span = max(m["written_at"] for m in markers) - min(m["started_at"] for m in markers)
    return {"records": manifest["counts"]["in"], "seconds": span, "stage_seconds": manifest["seconds"]}


def _link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` made of hard links (instant; the builds replace files, they never write into them)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, copy_function=os.link)


def run_bench(arch: str, images: int, image_px: int, executors: list[str], run: EmbedRun,
              scratch: Path | None = None) -> list[tuple[str, ...]]:  # fmt: skip
    """Rows of (path, where, images/s, stage seconds, ratio to the encoder); a Ray row also gets its ratio to
    the local one (the Ray overhead). The synthetic shards and the built source stage (not timed) are made once
    per size and reused by the next build: in ``scratch`` when given (the suite's, across its parts), else
    within this call."""
    rows = []
    ceiling, where, image_size, text_rate = encoder_ceiling(arch, run.batch_size, images, run.device, run.precision,
                                                            run.compile)  # fmt: skip
    label = "image encoder only" + (f" (compiled, {run.compile})" if run.compile else "")
    rows.append((label, where, f"{ceiling:,.0f}", "-", "1.00", ""))
    # the stage also runs the text tower, which the ceiling leaves out
    rows.append(("  per batch: text tower", f"{where}, trimmed captions/s", f"{text_rate:,.0f}", "-",
                 f"{text_rate / ceiling:.2f}", ""))  # fmt: skip
    for name, where, rate in host_work_rates(arch, image_size, run.batch_size, image_px, run.device):
        rows.append((f"  per batch: {name}", where, f"{rate:,.0f}", "-", f"{rate / ceiling:.2f}", ""))
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="saferclip-bench-", dir=scratch) as tmp:
        kept = scratch or Path(tmp)
        shards = kept / f"shards-{images}-{image_px}"
        if not (shards / "done").is_file():
            shutil.rmtree(shards, ignore_errors=True)
            synthetic_shards(shards, images, image_px)
            (shards / "done").touch()
        built_source = kept / f"source-{images}-{image_px}"
        for executor in executors:
            if built_source.is_dir():
                _link_tree(built_source, Path(tmp) / executor / "w" / "source")
            result = end_to_end(shards, Path(tmp) / executor, arch, executor, run)
            if not built_source.is_dir():
                _link_tree(Path(tmp) / executor / "w" / "source", built_source)
            rate = rates[executor] = result["records"] / result["seconds"]
            workers = run.concurrency if executor == "ray" else 1
            vs_local = f"{rate / rates['local']:.2f}" if executor != "local" and "local" in rates else ""
            rows.append((f"embed stage, {executor}", f"{workers} worker(s) x {run.cpus:g} cpus, gpus {run.gpus}",
                         f"{rate:,.0f}", f"{result['seconds']:.2f} ({result['stage_seconds']:.2f})",
                         f"{rate / ceiling:.2f}", vs_local))  # fmt: skip
    return rows
