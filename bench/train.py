"""`saferclip-data bench train`: trainer steps per second, the FLOPs one step does, and MFU.

One step is what ``train`` does per batch: the trained encoders on unsafe and safe images and captions, the
frozen reference on the same, the SaFeR-CLIP loss, backward and the optimiser (LoRA or full). The FLOPs are
counted by torch's own ``FlopCounterMode`` on one real step (forward and backward, matmuls and convolutions),
not estimated from a formula; MFU divides the achieved FLOP/s by the device's peak (a table of dense bf16
peaks for common GPUs, or ``--peak-tflops``). Synthetic batches isolate the compute from data loading.
"""

from __future__ import annotations

import time

import torch

#: dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name()
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def synthetic_batch(clip, batch_size: int, device: torch.device) -> dict:
    """Random pixels, real tokens of varied captions, unit target embeddings: a batch as ``collate`` makes it
    and the trainer moves it (row flags stay on the host)."""
    from saferclip_data.models.clip import text_trim
    from saferclip_data.training.device import batch_to_device

    size, dim = clip.image_size, clip.embed_dim
    g = torch.Generator().manual_seed(0)
    captions = [f"a photo of {i} red cubes on a table by the window" for i in range(batch_size)]

    def unit(n):
        x = torch.randn(n, dim, generator=g)
        return x / x.norm(dim=1, keepdim=True)

    batch = {
        "unsafe_image": torch.randn(batch_size, 3, size, size, generator=g),
        "safe_image": torch.randn(batch_size, 3, size, size, generator=g),
        "unsafe_text": clip.tokenizer([c + " with blood" for c in captions]),
        "safe_text": clip.tokenizer(captions),
        "has_image": torch.ones(batch_size, dtype=torch.bool),
        "has_safe_image": torch.ones(batch_size, dtype=torch.bool),
        "target_text": unit(batch_size),
        "target_image": unit(batch_size),
    }
    trim = text_trim(clip.model)
    if trim is not None:  # as the trainer's collate does
        batch["unsafe_text"], batch["safe_text"] = trim(batch["unsafe_text"], batch["safe_text"])
    return batch_to_device(batch, device)


def bench_train(arch: str, finetune: str, batch_size: int, steps: int, precision: str, device_name: str,
                peak: float | None = None, reference_precision: str = "auto",
                compile_mode: str | None = None) -> dict:  # fmt: skip
    """One step counted (FLOPs, eagerly), warm-up steps (compiling, with ``compile_mode``), ``steps`` timed."""
    from torch.utils.flop_counter import FlopCounterMode

    from saferclip_data.models.clip import load_clip
    from saferclip_data.training.adapters import AdapterSettings
    from saferclip_data.training.device import autocast_for, reference_dtype
    from saferclip_data.training.reference import TrainedWithReference

    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    clip = load_clip(arch, None, init_seed=0)
    ref_dtype = reference_dtype(device, precision, reference_precision)
    pair = TrainedWithReference(clip.model.to(device), AdapterSettings(finetune=finetune), ref_dtype)
    params = pair.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(clip, batch_size, device)

    def step() -> None:
        with autocast_for(device, precision):
            loss, _ = pair.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    compiled = pair.compile(compile_mode) if compile_mode is not None else {}
    for _ in range(1 if compile_mode is None else 3):  # warm-up; compiling, and recording CUDA graphs, takes more
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    achieved = flops * steps / seconds
    peak = peak or peak_tflops(device)
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "trainable_parameters": sum(p.numel() for p in params),
        "samples_per_s": batch_size * steps / seconds,
        "step_seconds": seconds / steps,
        "flops_per_sample": flops / batch_size,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "reference": str(ref_dtype or "as trained").replace("torch.", ""),
        "compiled": "; ".join(f"{side}: {', '.join(towers) or 'none'}" for side, towers in compiled.items()) or "no",
    }  # fmt: skip


def noise_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Photo-like synthetic JPEGs (a coloured gradient plus noise, so the codec has work) for the benchmarks,
    which encode a few and reuse them: decoding costs the same, encoding tens of thousands would not."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for _ in range(count):
        pixels = base[None, :, None] * rng.random(3)[None, None, :] + rng.normal(0, 20, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


CAPTION_PARTS = (
    ["a young woman", "an old man", "two children", "a tall cyclist", "a street musician", "a family of four",
     "a brown dog", "a group of hikers", "a chef in a white apron", "a girl with a kite"],
    ["walking slowly", "standing quietly", "laughing together", "sitting on a wooden bench", "carrying groceries",
     "looking at the camera", "waiting for the bus", "reading a newspaper"],
    ["along the river", "in a crowded market", "near the old stone bridge", "on a snowy mountain path",
     "outside a small cafe", "in the middle of a sunflower field", "by the harbour", "under a red umbrella"],
    ["at dusk", "on a rainy afternoon", "in the early morning light", "during a summer festival", "at night",
     "on a foggy day", "in autumn", "under a clear blue sky"],
)  # fmt: skip


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """Captions of the length web alt-texts and ViSU captions have (10-20 words, 15-29 tokens with start and
    end), so the benchmarks tokenise and run the text tower on realistic widths; a number keeps each distinct."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(part) for part in CAPTION_PARTS) + f", photo {i}" for i in range(count)]


def synthetic_quad_shards(folder, samples: int, image_px: int, dim: int, per_tar: int = 500, distinct: int = 64):
    """Quadruplet tars in the shards stage's layout (JPEGs, captions, target embeddings, json), to time the real
    loader without a build; ``distinct`` pictures are encoded and reused."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs = noise_jpegs(min(samples, distinct), image_px)
    captions = synthetic_captions(samples)

    def npy(n: int) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal((n, dim)).astype(np.float16))
        return buffer.getvalue()

    for start in range(0, samples, per_tar):
        # written as the shards stage writes them (a whole-second mtime: no pax header per member)
        with wds.TarWriter(str(folder / f"quad-{start // per_tar:05d}.tar"), mtime=0, user="saferclip",
                           group="saferclip", mode=0o444) as writer:  # fmt: skip
            for i in range(start, min(samples, start + per_tar)):
                meta = {"difficulty": "easy", "category": "violence", "given_pair": f"s{i}"}
                sample = {
                    "__key__": f"u{i:07d}",
                    "unsafe.jpg": jpegs[i % len(jpegs)],
                    "safe.jpg": jpegs[-1 - i % len(jpegs)],
                    "unsafe.txt": f"{captions[i]} with a knife".encode(),
                    "safe.txt": captions[i].encode(),
                    "targets_text.npy": npy(4),
                    "targets_image.npy": npy(4),
                    "json": json.dumps(meta).encode(),
                }
                writer.write(sample)
    return folder


def loader_rate(arch: str, batch_size: int, workers: int, samples: int = 2048, image_px: int = 256,
                decode: str = "auto") -> tuple[float, str, float]:  # fmt: skip
    """(samples/s, where images were decoded, stream samples/s) of the trainer's data path on synthetic quad
    shards: tar reading, JPEG decoding and preprocessing (PIL in the workers, or on the device as the trainer does
    with ``decode``), tokenising, collating, the copy to the device; ``workers`` DataLoader processes. The
    stream rate, on the same shards, is :func:`_stream_rate`'s."""
    import tempfile
    from pathlib import Path

    from saferclip_data.models.clip import load_clip, text_trim
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.device import batch_to_device, device_decoder

    clip = load_clip(arch, None, init_seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder = device_decoder(clip, decode, device)
    with tempfile.TemporaryDirectory(prefix="saferclip-loader-") as tmp:
        shards = synthetic_quad_shards(Path(tmp), samples, image_px, clip.embed_dim)
        urls = sorted(str(p) for p in shards.glob("*.tar"))
        preprocess = None if decoder is not None else clip.preprocess
        stream = quad_pipeline(urls, preprocess, clip.tokenizer, clip.image_size, epoch=2,
                               batch_size=batch_size, text_trim=text_trim(clip.model))  # fmt: skip
        if workers:
            stream = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                 pin_memory=device.type == "cuda", prefetch_factor=4)  # fmt: skip

        def deliver(batch: dict) -> int:
            batch_to_device(batch, device, decoder)
            return len(batch["key"])

        iterator = iter(stream)
        first = deliver(next(iterator))  # worker start-up is not the steady rate
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, count = time.perf_counter(), 0
        for batch in iterator:
            count += deliver(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        streamed = _stream_rate(clip, urls, samples)
    where = f"{device.type} (nvJPEG)" if decoder is not None and device.type == "cuda" else (
        "device tensors" if decoder is not None else "PIL in the loader")  # fmt: skip
    return (count / seconds if count else first / seconds), where, streamed


def _stream_rate(clip, urls: list[str], samples: int, share: int = 8) -> float:
    """Samples/s of the epoch stream one DataLoader worker of ``share`` reads: every DataLoader worker reads the
    whole stream (headers, captions, metadata) and keeps every ``share``-th sample, whose images it leaves encoded
    for the device and whose captions it tokenises. Under DDP a rank gets at most this divided by the number of
    ranks, whatever its worker count, so this bounds how far the trainer's data path scales."""
    from saferclip_data.models.clip import text_trim
    from saferclip_data.training.data import quad_pipeline

    def read() -> None:
        stream = quad_pipeline(urls, None, clip.tokenizer, clip.image_size, epoch=2, batch_size=64, rank=0,
                               world_size=share, text_trim=text_trim(clip.model))  # fmt: skip
        for _ in stream:
            pass

    read()  # warm-up: page cache, tokenizer cache
    started = time.perf_counter()
    read()
    return samples / (time.perf_counter() - started)


def loader_figures(model: str, batch_size: int, device: str, workers: int | None,
                   step_rate: float) -> tuple[str, str]:  # fmt: skip
    """The data path's samples/s as printed (workers, where images are decoded, the stream rate per worker) and
    its ratio to the training step's."""
    import torch

    from saferclip_data.training.device import loader_workers

    where = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = workers if workers is not None else loader_workers("auto", where)
    rate, where_decoded, stream = loader_rate(model, batch_size, workers)
    return (f"{rate:,.1f}/s ({workers} workers, {where_decoded}; stream {stream:,.0f}/s per worker of 8)",
            f"{rate / step_rate:.2f}")
