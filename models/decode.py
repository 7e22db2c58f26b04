"""Image bytes to model-ready pixels, in two ways that give the same picture.

``decode_pil`` runs the model's own preprocessing (PIL resize, centre crop, normalise) image by image: the
reference, and the CPU default. ``decode_tensors`` does the same steps as tensor operations on a device: JPEGs
in one batched call (nvJPEG when the device is CUDA), other formats through torchvision's CPU decoders, and
images of one size resized together. On a GPU this keeps decoding off the CPU; on the CPU it exists so that
the GPU path's arithmetic is tested where the tests run. Either returns ``(pixels or None, ok, failed)``:
pixels of the decodable images in input order, their input positions, and ``(position, error)`` for the rest.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

JPEG_MAGIC = b"\xff\xd8\xff"

Decoded = tuple[Any, list[int], list[tuple[int, str]]]


def byte_views(column: Any) -> list[Any]:
    """An Arrow binary column as one numpy uint8 view per row (None for null or empty rows), over one writable
    copy per chunk: a batch of 512 JPEGs costs one copy instead of a ``bytes`` and a ``bytearray`` per image
    (the tensor decoders need writable memory; Arrow's is read-only). PIL and the decoders take the views as
    they take ``bytes``."""
    import numpy as np
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[Any] = []
    for chunk in chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            raise TypeError(f"image bytes must be a binary column, not {chunk.type}")
        if len(chunk) == 0:
            continue
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset : chunk.offset + len(chunk) + 1]
        data_buffer = chunk.buffers()[2]
        data = np.frombuffer(data_buffer, np.uint8)[offsets[0] : offsets[-1]].copy() if data_buffer else None
        bounds = (offsets - offsets[0]).tolist()
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            views.append(data[start:end] if valid[row] and end > start else None)
    return views


def to_rgb(img: Any) -> Any:
    """A PIL image as 8-bit RGB the way it is meant to be seen: turned by its EXIF orientation, high bit depths
    (16-bit, 32-bit integer, float) scaled to 0-255 instead of clipped at 255 (``convert`` would turn nearly
    every pixel of a 16-bit image white), transparency laid on white."""
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255) else 255.0
        if img.mode == "F":
            top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_pil(blobs: list[bytes], preprocess: Callable) -> Decoded:
    import torch
    from PIL import Image

    tensors, ok, failed = [], [], []
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                tensors.append(preprocess(to_rgb(img)))
            ok.append(i)
        except Exception as exc:  # PIL raises many types for bad data; each becomes a reject
            failed.append((i, f"{type(exc).__name__}: {exc}"))
    return (torch.stack(tensors) if tensors else None), ok, failed


def _decode_all(blobs: list[bytes], device: Any) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """uint8 CHW RGB tensors on ``device`` by input position, and the failures."""
    import torch
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    raw = [torch.from_numpy(b) if hasattr(b, "__array__") else torch.frombuffer(bytearray(b), dtype=torch.uint8)
           for b in blobs]  # fmt: skip
    decoded: dict[int, Any] = {}
    failed: list[tuple[int, str]] = []
    jpegs = [i for i, b in enumerate(blobs) if bytes(b[:3]) == JPEG_MAGIC]
    try:
        images = decode_jpeg([raw[i] for i in jpegs], device=device, mode=ImageReadMode.RGB) if jpegs else []
        decoded.update(zip(jpegs, images))
    except RuntimeError:
        for i in jpegs:  # one bad JPEG fails the batched call: decode one by one to find it
            try:
                decoded[i] = decode_jpeg(raw[i], device=device, mode=ImageReadMode.RGB)
            except RuntimeError as exc:
                failed.append((i, _error(exc)))
    jpeg_set = set(jpegs)
    for i in range(len(blobs)):
        if i in jpeg_set:
            continue
        try:
            decoded[i] = decode_image(raw[i], mode=ImageReadMode.RGB).to(device, non_blocking=True)
        except RuntimeError as exc:
            failed.append((i, _error(exc)))
    return decoded, sorted(failed)


def normalization(preprocess: Any, device: Any = "cpu") -> tuple[Any, Any]:
    """(mean, std) of the preprocessing's Normalize step as (1, 3, 1, 1) tensors on ``device``."""
    import torch

    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (normalize.mean, normalize.std))
    return mean, std


def _error(exc: Exception) -> str:
    """torchvision's message without the C++ source location it carries."""
    return f"{type(exc).__name__}: " + re.sub(r"\s*\S+\.cpp:\d+,?", "", str(exc)).strip(" ,")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shortest side to ``size``, the other scaled and truncated (torchvision ``Resize(int)``'s rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def decode_tensors(blobs: list[bytes], size: int, mean: Any, std: Any, device: Any) -> Decoded:
    """Decode, resize the shortest side to ``size`` (bicubic, antialiased), centre-crop and normalise on
    ``device``; ``mean``/``std`` are (1, 3, 1, 1) tensors there. Output float32."""
    import torch
    import torch.nn.functional as F

    decoded, failed = _decode_all(blobs, device)
    ok = sorted(decoded)
    if not ok:
        return None, ok, failed
    out = torch.empty((len(ok), 3, size, size), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for slot, i in enumerate(ok):
        by_shape[tuple(decoded[i].shape[-2:])].append(slot)
    for (h, w), slots in by_shape.items():  # one interpolation per distinct input size
        images = torch.stack([decoded[ok[s]] for s in slots]).float()
        new_h, new_w = resized_shape(h, w, size)
        if (new_h, new_w) != (h, w):
            images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp_(0, 255).round_()  # as the uint8 picture PIL would hand over
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        out[torch.as_tensor(slots, device=device)] = images[..., top : top + size, left : left + size]
    return (out / 255.0 - mean) / std, ok, failed


#: preprocessing steps that only change the format (mode, tensor type), not the picture
FORMAT_ONLY = frozenset({"MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "convert_to_rgb"})


def _name(step: Any) -> str:
    return getattr(step, "__name__", None) or type(step).__name__


def tensor_path_mismatch(preprocess: Any, size: int) -> str | None:
    """Why ``decode_tensors`` would not reproduce ``preprocess`` (None when it does): it implements exactly
    Resize(shortest side, bicubic) → CenterCrop → RGB → ToTensor → Normalize, open_clip's default."""
    from torchvision.transforms import InterpolationMode, Resize

    steps = [t for t in getattr(preprocess, "transforms", []) if _name(t) not in FORMAT_ONLY]
    kinds = [_name(t) for t in steps]
    if kinds != ["Resize", "CenterCrop", "Normalize"] or not isinstance(steps[0], Resize):
        return f"preprocessing steps {kinds} are not Resize, CenterCrop, Normalize"
    resize, crop = steps[0], steps[1]
    if resize.size not in (size, [size], (size,)) or resize.interpolation != InterpolationMode.BICUBIC:
        return f"resize {resize.size} {resize.interpolation} is not the shortest side to {size}, bicubic"
    if tuple(crop.size) != (size, size):
        return f"centre crop {crop.size} is not {size}x{size}"
    return None


class DeviceDecoder:
    """Decodes a training batch's encoded images on the training device (nvJPEG on CUDA) with the model's
    preprocessing, so that DataLoader workers only read tars and tokenise: PIL decoding on the CPU (about 130
    images/s per core) would otherwise starve a GPU training a small model."""

    FIELDS = ("unsafe_image", "safe_image")

    def __init__(self, preprocess: Any, image_size: int, device: Any):
        mismatch = tensor_path_mismatch(preprocess, image_size)
        if mismatch:
            raise ValueError(f"images cannot be decoded on the device for this model: {mismatch}")
        self.size, self.device = image_size, device
        self.mean, self.std = normalization(preprocess, device)

    def __call__(self, batch: dict) -> dict:
        import torch

        out = dict(batch)
        for name in self.FIELDS:
            blobs = batch.get(name)
            if not isinstance(blobs, list):
                continue  # already pixels
            pixels = torch.zeros((len(blobs), 3, self.size, self.size), device=self.device)
            rows = [i for i, b in enumerate(blobs) if b]
            decoded, ok, failed = decode_tensors([blobs[i] for i in rows], self.size, self.mean, self.std, self.device)
            if failed:
                position, error = failed[0]
                raise ValueError(f"sample {batch['key'][rows[position]]}: {name} does not decode ({error})")
            if decoded is not None:
                pixels[torch.as_tensor([rows[j] for j in ok], device=self.device)] = decoded
            out[name] = pixels
        return out
