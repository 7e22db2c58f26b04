"""`saferclip-data bench embed`: the embed stage end to end against the bare image encoder.

The ceiling is the image tower alone on already-preprocessed pixels, at the stage's device, precision and
batch size, with the model at random init (weights do not change the cost). End to end is a real ``build`` of
a source + embed recipe over WebDataset shards of synthetic JPEGs, run as a subprocess per executor, timed by
the embed stage's own manifest (Ray start-up and model loading excluded, decoding, text embedding and writing
included). The ratio of the two is what the GPU issue asks to be ≥ 0.9.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def synthetic_shards(folder: Path, images: int, size: int, per_tar: int = 1000, seed: int = 0) -> Path:
    """JPEG photos-like noise (smooth gradients + noise, so the codec has work) with short captions, as tars."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = np.linspace(0, 255, size, dtype=np.float32)
    for start in range(0, images, per_tar):
        with wds.TarWriter(str(folder / f"bench-{start // per_tar:05d}.tar")) as writer:
            for i in range(start, min(images, start + per_tar)):
                pixels = base[None, :, None] * rng.random(3)[None, None, :] + rng.normal(0, 20, (size, size, 3))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                writer.write({"__key__": f"img{i:07d}", "jpg": buffer.getvalue(), "txt": f"a photo number {i}"})
    return folder


def encoder_ceiling(arch: str, batch_size: int, images: int, device: str, precision: str) -> tuple[float, str]:
    """(images/s of the image tower alone, device description) on random pixels of the model's input size."""
    import torch

    from saferclip_data.stages.embed import ModelConfig, load_worker_model

    _, model, dev, dtype = load_worker_model(ModelConfig(arch=arch), device, precision, "bench")
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pixels = torch.randn(batch_size, 3, size, size, device=dev, dtype=dtype)
    batches = max(1, images // batch_size)

    def run() -> None:
        with torch.no_grad():
            for _ in range(batches):
                model.encode_image(pixels)
        if dev == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up: kernels, allocator
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    where = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return batches * batch_size / seconds, f"{where}, {dtype}".replace("torch.", "")


def end_to_end(shards: Path, work: Path, arch: str, executor: str, batch_size: int, concurrency: int,
               device: str, precision: str, cpus: float = 1.0) -> dict:  # fmt: skip
    """Build source + embed over the shards with ``executor``; the embed stage's records/s and seconds."""
    recipe = {
        "name": "bench",
        "source": {"kind": "webdataset", "path": str(shards)},
        "model": {"arch": arch, "pretrained": None, "init_seed": 0},
        "stages": {"embed": {"batch_size": batch_size, "concurrency": concurrency, "device": device,
                             "precision": precision, "cpus": cpus}},
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "saferclip_data.pipeline.cli", "build", str(path), "-w", str(work / "w"),
           "--executor", executor, "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{executor} build failed: {proc.stderr.strip().splitlines()[-1:]}")
    manifest = json.loads((work / "w" / "embed" / "_manifest.json").read_text())
    return {"records": manifest["counts"]["in"], "seconds": manifest["seconds"]}


def run_bench(arch: str, images: int, image_px: int, batch_size: int, concurrency: int, executors: list[str],
              device: str, precision: str, cpus: float = 1.0) -> list[tuple[str, ...]]:  # fmt: skip
    rows = []
    ceiling, where = encoder_ceiling(arch, batch_size, images, device, precision)
    rows.append(("image encoder only", where, f"{ceiling:,.0f}", "-", "1.00"))
    with tempfile.TemporaryDirectory(prefix="saferclip-bench-") as tmp:
        shards = synthetic_shards(Path(tmp) / "shards", images, image_px)
        for executor in executors:
            result = end_to_end(shards, Path(tmp) / executor, arch, executor, batch_size, concurrency, device,
                                precision, cpus)  # fmt: skip
            rate = result["records"] / result["seconds"]
            rows.append((f"embed stage, {executor}", f"{concurrency} worker(s) x {cpus:g} cpus", f"{rate:,.0f}",
                         f"{result['seconds']:.2f}", f"{rate / ceiling:.2f}"))  # fmt: skip
    return rows
