"""A battery of awkward but ordinary image files (and a few broken ones), generated with Pillow: what a crawl or a
user's folder holds. Every decoder must give the same kept/rejected verdict and the same picture for them."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

SIZE = (48, 32)  # width, height: not square, so a wrong orientation shows


def _gradient(size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with a distinct corner, so orientation and colour errors show in the pixels."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    img = np.stack([base[0] + 50 * x / w, base[1] + 50 * y / h, base[2] + 30 * (x + y) / (w + h)], -1)
    img[: h // 4, : w // 4] = (250, 20, 20)
    return img.clip(0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_48bit(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads these but cannot write them)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) + \
        _png_chunk(b"IEND", b"")


def with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())


def odd_images(size: tuple[int, int] = SIZE) -> dict[str, bytes]:
    """name -> encoded bytes: 40+ files of about ``size`` (width, height), each a case decoders get wrong."""
    rgb = _gradient(size)
    img = Image.fromarray(rgb)
    out: dict[str, bytes] = {}
    out["jpeg"] = _save(img, "JPEG", quality=95)
    out["jpeg-progressive"] = _save(img, "JPEG", quality=90, progressive=True)
    out["jpeg-grey"] = _save(img.convert("L"), "JPEG", quality=95)
    out["jpeg-cmyk"] = _save(img.convert("CMYK"), "JPEG", quality=95)
    out["jpeg-tall"] = _save(Image.fromarray(_gradient((20, 70), 1)), "JPEG", quality=95)
    out["jpeg-wide"] = _save(Image.fromarray(_gradient((90, 24), 2)), "JPEG", quality=95)
    out["jpeg-1x1"] = _save(Image.new("RGB", (1, 1), (10, 200, 30)), "JPEG", quality=95)
    out["jpeg-truncated"] = out["jpeg"][: len(out["jpeg"]) * 4 // 5]
    out["jpeg-header-only"] = out["jpeg"][:200]
    for orientation in range(1, 9):
        out[f"jpeg-exif-{orientation}"] = with_orientation(rgb, orientation)
    out["png"] = _save(img, "PNG")
    out["png-1x1"] = _save(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG")
    out["png-grey"] = _save(img.convert("L"), "PNG")
    grey16 = (np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16)
    out["png-16bit-grey"] = _save(Image.fromarray(grey16), "PNG")
    out["png-48bit"] = png_48bit(rgb.astype(np.uint16) * 257)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))])
    out["png-rgba"] = _save(Image.fromarray(rgba, "RGBA"), "PNG")
    out["png-la"] = _save(Image.fromarray(rgba, "RGBA").convert("LA"), "PNG")
    palette = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    out["png-palette-transparent"] = _save(palette, "PNG", transparency=0)
    out["png-palette"] = _save(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")
    out["png-1bit"] = _save(img.convert("1"), "PNG")
    frames = [Image.fromarray(_gradient(size, s)) for s in range(3)]
    out["gif-animated"] = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["gif"] = _save(img.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    out["gif-transparent"] = _save(palette, "GIF", transparency=0)
    out["webp"] = _save(img, "WEBP", quality=95)
    out["webp-lossless-alpha"] = _save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True)
    out["webp-animated"] = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out["tiff"] = _save(img, "TIFF")
    out["tiff-16bit-grey"] = _save(Image.fromarray(grey16), "TIFF")
    out["tiff-float"] = _save(Image.fromarray(np.asarray(img.convert("L"), np.float32) / 255.0), "TIFF")
    out["tiff-cmyk"] = _save(img.convert("CMYK"), "TIFF")
    out["bmp"] = _save(img, "BMP")
    out["bmp-grey"] = _save(img.convert("L"), "BMP")
    out["avif"] = _save(img, "AVIF", quality=95)
    out["ico"] = _save(img, "ICO")
    out["garbage"] = bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))
    out["text"] = b"this is not an image\n"
    out["png-truncated"] = out["png"][: len(out["png"]) // 2]
    out["jpeg-magic-only"] = b"\xff\xd8\xff" + b"\x00" * 40
    return out
