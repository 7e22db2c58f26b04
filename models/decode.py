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


def plain_jpeg(blob: Any) -> bool:
    """A JPEG that the tensor decoders read exactly as PIL does: grey or YCbCr (PIL's lazy open reads only the
    headers to tell). CMYK and YCCK JPEGs are left to PIL, whose inversion of Adobe's CMYK is the reference; so is
    a JPEG whose headers do not parse (PIL then gives the reject its reason)."""
    if bytes(blob[:3]) != JPEG_MAGIC:
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.format == "JPEG" and img.mode in ("L", "RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types for bad headers; PIL's own path reports them
        return False


def pil_tensor(blob: Any) -> Any:
    """One image through PIL and :func:`to_rgb` as a uint8 CHW tensor: the reference decoding, which every path
    falls back to where a faster decoder would read the file differently (or not at all)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        rgb = to_rgb(img)
    return torch.from_numpy(np.array(rgb, np.uint8)).permute(2, 0, 1)


def _decode_all(blobs: list[Any], device: Any) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """uint8 CHW RGB tensors on ``device`` by input position, and the failures. Plain JPEGs are decoded in one
    batched call (nvJPEG on CUDA), EXIF orientation applied; every other image, and any JPEG the batched decoder
    refuses, through PIL (:func:`pil_tensor`), so both paths keep and reject the same files and see the same
    picture: first frame of an animation, transparency on white, high bit depths scaled, TIFF, BMP, AVIF."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded: dict[int, Any] = {}
    jpegs = [i for i, b in enumerate(blobs) if plain_jpeg(b)]
    raw = {i: torch.from_numpy(blobs[i]) if hasattr(blobs[i], "__array__")
           else torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs}  # fmt: skip
    try:
        images = decode_jpeg([raw[i] for i in jpegs], device=device, mode=ImageReadMode.RGB,
                             apply_exif_orientation=True) if jpegs else []  # fmt: skip
        decoded.update(zip(jpegs, images))
    except RuntimeError:
        for i in jpegs:  # one bad JPEG fails the batched call: decode one by one, PIL deciding on the rest
            try:
                decoded[i] = decode_jpeg(raw[i], device=device, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            except RuntimeError:
                pass
    failed: list[tuple[int, str]] = []
    for i in range(len(blobs)):
        if i in decoded:
            continue
        try:
            decoded[i] = pil_tensor(blobs[i]).to(device, non_blocking=True)
        except Exception as exc:  # PIL raises many types for bad data; each becomes a reject
            failed.append((i, f"{type(exc).__name__}: {exc}"))
    return decoded, failed


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


def _bicubic(x: Any) -> Any:
    """PIL's bicubic kernel (a = -0.5; torch's ``interpolate`` uses -0.75 and so sharpens edges differently)."""
    x = x.abs()
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return near * (x < 1) + far * ((x >= 1) & (x < 2))


def resample_weights(source: int, target: int, first: int, count: int, device: Any) -> Any:
    """(count, source) weights of output pixels ``first .. first + count`` of a bicubic resize from ``source`` to
    ``target`` pixels, as Pillow computes them (support widened by the scale when shrinking: its antialiasing)."""
    import torch

    scale = source / target
    support = 2.0 * max(scale, 1.0)
    centre = (torch.arange(first, first + count, dtype=torch.float64) + 0.5) * scale
    low = torch.clamp((centre - support + 0.5).floor(), min=0)
    high = torch.clamp((centre + support + 0.5).floor(), max=source)
    x = torch.arange(source, dtype=torch.float64)
    inside = (x[None, :] >= low[:, None]) & (x[None, :] < high[:, None])
    weights = _bicubic((x[None, :] - centre[:, None] + 0.5) / max(scale, 1.0)) * inside
    return (weights / weights.sum(1, keepdim=True)).to(device=device, dtype=torch.float32)


def decode_tensors(blobs: list[bytes], size: int, mean: Any, std: Any, device: Any) -> Decoded:
    """Decode, resize the shortest side to ``size`` (bicubic, antialiased, with Pillow's kernel and its two
    passes, each rounded to 8 bits as Pillow's are), centre-crop and normalise on ``device``; ``mean``/``std``
    are (1, 3, 1, 1) tensors there. Only the kept rows and columns of the resize are computed. Output float32."""
    import torch

    decoded, failed = _decode_all(blobs, device)
    ok = sorted(decoded)
    if not ok:
        return None, ok, failed
    out = torch.empty((len(ok), 3, size, size), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for slot, i in enumerate(ok):
        by_shape[tuple(decoded[i].shape[-2:])].append(slot)
    for (h, w), slots in by_shape.items():  # one resize per distinct input size
        images = torch.stack([decoded[ok[s]] for s in slots]).float()
        new_h, new_w = resized_shape(h, w, size)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        if new_w != w:  # horizontal pass first, as Pillow does
            images = (images @ resample_weights(w, new_w, left, size, device).T).round_().clamp_(0, 255)
        else:
            images = images[..., left : left + size]
        if new_h != h:
            images = (resample_weights(h, new_h, top, size, device) @ images).round_().clamp_(0, 255)
        else:
            images = images[..., top : top + size, :]
        out[torch.as_tensor(slots, device=device)] = images
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
