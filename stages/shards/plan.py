"""The shards stage's planning steps: every record's training status, the samples of each tar group, and the
records a quad sample needs from elsewhere joined to it through hash buckets (no process holds the data set).

The seeded shuffle puts samples in the order of ``sha256(seed:key)``; that digest also picks a sample's *group*
(a range of digests), so a group's samples are known without a global sort.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet
from saferclip_data.stages.columns import unit_rows

WORK_DIR = "_tasks"
BUCKETS = 16  # hash buckets of the request join


def task_dir(root: str, *parts: str) -> Path:
    """Where the stage's steps leave their pieces for the next step."""
    return Path(root, "shards", WORK_DIR, *parts)


def digest(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def bucket(key: str, buckets: int = BUCKETS) -> int:
    return int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % buckets


def group_of(hexdigest: str, groups: int) -> int:
    return (int(hexdigest[:8], 16) * groups) >> 32


def write_piece(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(path, table)


def blocked_keys(root: str, inputs: dict, shard_id: str, held_column: bool, split_column: str,
                 excluded: list[str]) -> tuple[list[str], bool]:  # fmt: skip
    """Step 0: keys of the shard that may not be a target (held out for the benchmark or in an excluded split),
    and whether any of its records names a given safe pair."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    held = table["held_out"].to_pylist() if held_column else [False] * table.num_rows
    splits = table[split_column].to_pylist()
    blocked = [k for k, h, s in zip(table["key"].to_pylist(), held, splits) if h or s in excluded]
    return blocked, table["given_pair"].null_count < table.num_rows


def training_status(table: pa.Table, targets: list[list], s: dict) -> list[str]:
    """Where each record goes: ``quad``, ``plain`` or why it stays out of training."""
    n = table.num_rows
    held = table["held_out"].to_pylist() if s["with_benchmark"] else [False] * n
    splits, roles = table[s["split_column"]].to_pylist(), table["role"].to_pylist()
    has_image = table["image_embedding"].is_valid().to_pylist()
    status = []
    for i in range(n):
        if held[i]:
            status.append("held out for the benchmark")
        elif splits[i] in s["excluded"]:
            status.append(f"split {splits[i]} excluded")
        elif roles[i] == "unsafe":
            status.append("quad" if targets[i] else "unsafe without admissible targets")
        elif not s["plain_view"]:
            status.append("safe (plain view off)")
        else:
            status.append("plain" if has_image[i] else "safe without image (not in the plain view)")
    return status


def plan_shard(root: str, inputs: dict, shard_id: str, index: int, s: dict) -> dict[str, Any]:
    """Step 1 for one input shard: statuses, the samples of each (kind, group) with what their tar needs of
    themselves, *requests* for what a quad sample needs from elsewhere (targets' frozen embeddings and captions,
    its given safe pair) and a copy of every record that may be asked for, both by hash bucket of the asked key.
    ``s`` holds the stage's settings."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    m, n = s["m"], table.num_rows
    blocked = set(pq.read_table(s["blocked"])["key"].to_pylist())
    mined = zip(table[f"{m}_targets"].to_pylist(), table[f"{m}_similarities"].to_pylist())
    targets = [[(t, x) for t, x in zip(ts or [], ss or []) if t not in blocked] for ts, ss in mined]
    status = training_status(table, targets, s)
    keys = table["key"].to_pylist()
    write_piece(task_dir(root, "plan", f"{index:06d}.parquet"), pa.table({"key": keys, "training": status}))
    columns = {c: table[c].to_pylist() for c in ("caption", "image", "given_pair", "category", f"{m}_difficulty")}
    columns["url"] = table["url"].to_pylist() if "url" in table.column_names else [None] * n
    per_group: dict[tuple[str, int], list[dict]] = defaultdict(list)
    requests: dict[int, list[tuple[str, str, int, str]]] = defaultdict(list)
    for i, kind in enumerate(status):
        if kind not in ("quad", "plain"):
            continue
        d = digest(s["seed"], keys[i])
        g = group_of(d, s["groups"][kind])
        row = {"digest": d, "key": keys[i], "shard": index, "caption": columns["caption"][i],
               "image": columns["image"][i], "url": columns["url"][i]}  # fmt: skip
        if kind == "quad":
            given = columns["given_pair"][i]
            row.update(given=given, category=columns["category"][i], difficulty=columns[f"{m}_difficulty"][i],
                       targets=[t for t, _ in targets[i]], similarities=[x for _, x in targets[i]])  # fmt: skip
            for t, _ in targets[i]:
                requests[bucket(t)].append((t, keys[i], g, "target"))
            if given is not None:
                requests[bucket(given)].append((given, keys[i], g, "given"))
        per_group[(kind, g)].append(row)
    for (kind, g), rows in per_group.items():
        write_piece(task_dir(root, "samples", f"{kind}-{g:05d}", f"{index:06d}.parquet"), pa.Table.from_pylist(rows))
    for b, rows in requests.items():
        need, requester, g, what = (list(c) for c in zip(*rows))
        part = pa.table({"need": need, "requester": requester, "group": pa.array(g, pa.int32()), "what": what})
        write_piece(task_dir(root, "requests", f"{b:03d}", f"{index:06d}.parquet"), part)
    _store(root, index, table, columns, s["given_pairs"])
    counts = {f"{kind}-{g}": len(rows) for (kind, g), rows in per_group.items()}
    return {"counts": counts, "status": dict(Counter(status))}


def _store(root: str, index: int, table: pa.Table, columns: dict[str, list], given_pairs: bool) -> None:
    """Every record may be asked for (a target or a given pair): its caption, frozen embeddings and (where the
    data has given pairs) image or URL, written by hash bucket of its key."""
    keys = table["key"].to_pylist()
    dim = table.schema.field("text_embedding").type.list_size
    text, _ = unit_rows(table["text_embedding"], dim)
    image, _ = unit_rows(table["image_embedding"], dim)
    store_rows = np.array([bucket(k) for k in keys], np.int64) if keys else np.zeros(0, np.int64)

    def vectors(matrix: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float16).reshape(-1)), dim)

    for b in np.unique(store_rows):
        at = np.flatnonzero(store_rows == b)
        part = pa.table({
            "key": pa.array([keys[i] for i in at], pa.string()),
            "caption": pa.array([columns["caption"][i] for i in at], pa.string()),
            "text": vectors(text[at]),
            "image_vector": vectors(image[at]),
            "image": pa.array([columns["image"][i] if given_pairs else None for i in at], pa.binary()),
            "url": pa.array([columns["url"][i] if given_pairs else None for i in at], pa.string()),
        })  # fmt: skip
        write_piece(task_dir(root, "store", f"{b:03d}", f"{index:06d}.parquet"), part)


def resolve_bucket(root: str, b: int) -> int:
    """Step 2: the requests of one hash bucket joined with the records they ask for, written per group."""
    folder = task_dir(root, "requests", f"{b:03d}")
    if not folder.is_dir():
        return 0
    requests = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    store_dir = task_dir(root, "store", f"{b:03d}")
    store = pa.concat_tables([pq.read_table(p) for p in sorted(store_dir.glob("*.parquet"))])
    at = pc.index_in(requests["need"], value_set=store["key"])
    found = pc.is_valid(at)
    requests, at = requests.filter(found), at.filter(found)
    joined = pa.table({
        "requester": requests["requester"], "what": requests["what"], "need": requests["need"],
        **{c: store[c].take(at) for c in ("caption", "text", "image_vector", "image", "url")},
    })  # fmt: skip
    groups = requests["group"].to_numpy()
    for g in np.unique(groups):
        write_piece(task_dir(root, "resolved", f"{g:05d}", f"{b:03d}.parquet"), joined.filter(pa.array(groups == g)))
    return joined.num_rows
