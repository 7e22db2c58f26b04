"""Small generated sources for the tests: coloured-shape JPEGs with captions, in every source layout."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"beach": (240, 220, 170), "forest": (30, 90, 40), "city": (120, 120, 130), "snow": (245, 245, 250)}


def scene(index: int, size: int = 64, fmt: str = "JPEG") -> tuple[bytes, str]:
    """A deterministic little scene and its caption."""
    rng = random.Random(index)
    place, background = rng.choice(list(PLACES.items()))
    colour, rgb = rng.choice(list(COLOURS.items()))
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(4, size // 2), rng.randint(4, size // 2)
    box = (x, y, x + size // 3, y + size // 3)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue(), f"a {colour} {shape} at the {place}"


def write_image_manifest(
    folder: Path, n: int, *, corrupt: tuple[int, ...] = (), empty_caption: tuple[int, ...] = (), fmt: str = "csv"
) -> Path:
    """Images as files plus a manifest naming them by relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = {"key": [], "caption": [], "image": [], "group": []}
    for i in range(n):
        data, caption = scene(i)
        if i in corrupt:
            data = data[: len(data) // 3]  # a truncated JPEG: header fine, data cut
        (folder / "images" / f"img{i:05d}.jpg").write_bytes(data)
        rows["key"].append(f"rec.{i:05d}")  # a dot on purpose: keys must come out dot-free
        rows["caption"].append("" if i in empty_caption else caption)
        rows["image"].append(f"images/img{i:05d}.jpg")
        rows["group"].append(f"g{i // 2:05d}")
    table = pa.table(rows)
    if fmt == "parquet":
        path = folder / "manifest.parquet"
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path = folder / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    else:
        path = folder / "manifest.csv"
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]], format: int = tarfile.PAX_FORMAT) -> Path:
    """A tar of ``members`` in order: a name ending in / is a folder, one ending in @link a symlink. A float
    mtime makes tarfile write a pax header per member, as webdataset's TarWriter does."""
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            elif name.endswith("@link"):
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
            else:
                info.size = len(data)
            info.mtime = 1.5
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def write_tar_shards(folder: Path, n: int, per_shard: int, *, truncate_last: bool = False) -> list[Path]:
    """WebDataset shards (jpg + txt + json per sample, contiguous); optionally cut the last tar mid-member."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, n, per_shard)):
        path = folder / f"shard-{shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                data, caption = scene(i)
                meta = json.dumps({"group": f"g{i // 2:05d}", "label": caption.split()[-1]}).encode()
                for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    if truncate_last:
        last = paths[-1]
        with tarfile.open(last) as tar:
            final_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
        cut = final_jpg.offset_data + final_jpg.size // 2  # inside the last sample's image data
        last.write_bytes(last.read_bytes()[:cut])
    return paths


def safety_recipe(work, **stages) -> dict:
    defaults = {
        "embed": {"batch_size": 128},
        "score": {"taxonomy": "toy-world", "role_column": "role", "probe": True},
        "filter": {},
        "dedup": {"by": ["image"], "image_threshold": 0.99995},
        "neighbours": {
            "modalities": ["text", "image-text"],
            "exclude_splits": ["shift", "test"],
            "pair_column": "paired_safe",
            "candidates": 12,
        },
        "mine": {"k": 3, "reuse_cap": 2},
    }
    for name, override in stages.items():
        defaults[name] = {**defaults[name], **override}
    return {
        "name": "safety",
        "workdir": str(work),
        "source": {"kind": "toy", "toy": {"seed": 3, "scenes": 150, "shifted_scenes": 30, "shard_size": 60}},
        "model": {"arch": "toy-resnet-tiny", "pretrained": None, "init_seed": 0},
        "stages": defaults,
    }
