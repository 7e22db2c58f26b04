"""Write the toy world as an ordinary source: WebDataset shards per split, a parquet manifest, world.json.

Same seed, same bytes: tar members carry a fixed mtime and owner, JSON is written with sorted keys, and every
file is written under a temp name and renamed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa

from saferclip_data.pipeline.workdir import atomic_path, atomic_write_bytes, atomic_write_parquet
from saferclip_data.toyworld.world import SPLITS, WorldConfig, config_dict, world_records

#: metadata columns of every toy record (beside key, caption and the image)
TOY_COLUMNS = (
    "split",
    "role",
    "source_safe",
    "paired_safe",
    "place",
    "main_object",
    "main_colour",
    "objects",
    "unsafe_phrase",
    "phrasing",
)


def world_fingerprint(config: WorldConfig) -> str:
    return hashlib.sha256(json.dumps(config_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def write_world(config: WorldConfig, out_dir: str | Path, on_record=None) -> dict:
    """Generate the world into ``out_dir``; returns the summary also written to ``world.json``."""
    import webdataset as wds  # imported here: it pulls in torch, which commands that only read recipes skip

    out = Path(out_dir)
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    # per split: the open tar (closing it closes the writer, then renames the file), writer, path, index, count
    writers: dict[str, tuple[ExitStack, wds.TarWriter, Path, int, int]] = {}
    shard_counts: Counter = Counter()
    rows: list[dict] = []

    def close(split: str) -> None:
        writers.pop(split)[0].close()

    for record in world_records(config):
        split = record["split"]
        state = writers.get(split)
        if state is not None and state[4] >= config.shard_size:
            close(split)
            state = None
        if state is None:
            index = shard_counts[split]
            shard_counts[split] += 1
            final = shards_dir / f"{split}-{index:05d}.tar"
            open_tar = ExitStack()
            tmp = open_tar.enter_context(atomic_path(final))
            writer = open_tar.enter_context(wds.TarWriter(str(tmp), mtime=0, user="toy", group="toy", mode=0o444))
            state = (open_tar, writer, final, index, 0)
        open_tar, writer, final, index, count = state
        meta = {k: record[k] for k in ("group", "label", "category", *TOY_COLUMNS)}
        writer.write(
            {
                "__key__": record["key"],
                "jpg": record["jpg"],
                "txt": record["caption"],
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
        writers[split] = (open_tar, writer, final, index, count + 1)
        rows.append({"key": record["key"], "caption": record["caption"], "shard": final.name, **meta})
        if on_record:
            on_record()
    for split in list(writers):
        close(split)

    manifest = pa.Table.from_pylist(rows)
    atomic_write_parquet(out / "manifest.parquet", manifest)
    counts = Counter((r["split"], r["role"]) for r in rows)
    summary = {
        "config": config_dict(config),
        "fingerprint": world_fingerprint(config),
        "records": len(rows),
        "by_split": {s: {"safe": counts[(s, "safe")], "unsafe": counts[(s, "unsafe")]} for s in SPLITS},
        "by_category": dict(sorted(Counter(r["category"] for r in rows if r["category"]).items())),
        "shards": sorted(p.name for p in shards_dir.glob("*.tar")),
    }
    atomic_write_bytes(out / "world.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary
