"""The members of a training tar's samples, shared by the in-process and the task-parallel shards writers."""

from __future__ import annotations

import io
import json

import numpy as np

from .benchmark_export import image_extension


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def quad_sample(key: str, caption: str, image: bytes | None, targets: list[tuple[str, float, str]],
                target_text: np.ndarray, target_image: np.ndarray, given: tuple[str, str, bytes | None] | None,
                category: str, difficulty: str, modality: str) -> dict:  # fmt: skip
    """One quad sample: the unsafe caption (and image, when it has one), its targets' frozen embeddings (k x dim,
    best first), the given safe pair when it survived, and the json (category, difficulty, target keys, ranks,
    similarities, captions). ``targets``: (key, similarity, caption); ``given``: (key, caption, image)."""
    sample = {
        "__key__": key,
        "unsafe.txt": caption,
        "targets_text.npy": npy_bytes(target_text),
        "targets_image.npy": npy_bytes(target_image),
    }
    if image:  # text-only unsafe records (ViSU-Text, NSFW-Caps) have no unsafe image
        sample[f"unsafe.{image_extension(image)}"] = image
    if given is not None:
        if given[2]:
            sample[f"safe.{image_extension(given[2])}"] = given[2]
        sample["safe.txt"] = given[1]
    meta = {
        "key": key,
        "category": category,
        "difficulty": difficulty,
        "modality": modality,
        "given_pair": given[0] if given is not None else None,
        "targets": [
            {"key": t, "rank": r + 1, "similarity": round(float(s), 6), "caption": c}
            for r, (t, s, c) in enumerate(targets)
        ],  # fmt: skip
    }
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample
