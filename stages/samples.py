"""Records read back from the source stage, and the members of tar samples: shared by the benchmark export,
the in-process and the task-parallel shards writers and the train command."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saferclip_data.pipeline.workdir import WorkDir

EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_extension(data: bytes) -> str:
    """The member extension for encoded image bytes (clip_benchmark decodes webp, png, jpg); PIL reads only the
    header to tell the format."""
    from PIL import Image

    fmt = Image.open(io.BytesIO(data)).format
    if fmt not in EXTENSION_OF_FORMAT:
        raise ValueError(f"image format {fmt} is not JPEG, PNG or WebP")
    return EXTENSION_OF_FORMAT[fmt]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_tables(workdir: WorkDir, keys: set[str], columns: list[str]) -> Iterator[pa.Table]:
    """The source rows of the given keys, one source shard at a time (only those rows leave the shard)."""
    wanted = pa.array(sorted(keys), pa.string())
    for shard in workdir.completed_shards("source"):
        table = workdir.read_shard("source", shard, columns)
        yield table.filter(pc.is_in(table["key"], value_set=wanted))


def source_rows(workdir: WorkDir, keys: set[str]) -> dict[str, dict]:
    """Caption and image bytes of the given keys, read shard by shard (only those rows are kept in memory)."""
    return {
        row["key"]: row
        for table in source_tables(workdir, keys, ["key", "caption", "image"])
        for row in table.to_pylist()
    }



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
