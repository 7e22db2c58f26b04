"""The shards stage as tasks: no process holds the data set, each writes one group of output tars.

The seeded shuffle puts samples in the order of ``sha256(seed:key)``; here that digest also picks a sample's
*group* (a range of digests), so a group's samples are known without a global sort, and each group writes its
own run of tars in digest order. The passes, each a set of tasks on the build's executor:

1. ``plan_shard`` (per input shard): every record's training status, as the in-process path decides it; the
   samples of each (kind, group) with what their tar needs of themselves; *requests* for the records a quad
   sample needs from elsewhere (its targets' frozen embeddings and captions, its given safe pair), and a copy
   of every record that may be asked for, both partitioned by a hash of the asked key.
2. ``resolve_bucket`` (per hash bucket): requests joined with the records asked for.
3. ``write_group`` (per kind and group): the group's samples in digest order, their requested records, and
   their images (fetched with img2dataset first when the source has URLs, not bytes: only the selected
   records' images are ever requested), written as tars numbered after the groups before it.
4. ``output_shard`` (per input shard): the stage output (key, role, training, tar) with every sample's final
   status (a failed image download is recorded with img2dataset's status, never dropped silently).

Tars hold ``samples_per_shard`` samples except each group's last; a record's tar and order are the same on
every run (same seed, same bytes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline.executors import worker_identity
from saferclip_data.pipeline.stage import GlobalContext, write_global_shard
from saferclip_data.pipeline.workdir import WorkDir, atomic_path, atomic_write_parquet
from saferclip_data.stages import download
from saferclip_data.stages.samples import image_extension, quad_sample, sha256_file
from saferclip_data.stages.score import unit_rows

WORK_DIR = "_tasks"
BUCKETS = 16  # hash buckets of the request join


def _dir(root: str, *parts: str) -> Path:
    path = Path(root) / "shards" / WORK_DIR
    for part in parts:
        path = path / part
    return path


def digest(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def bucket(key: str, buckets: int = BUCKETS) -> int:
    return int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % buckets


def group_of(hexdigest: str, groups: int) -> int:
    return (int(hexdigest[:8], 16) * groups) >> 32


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(path, table)


def blocked_keys(root: str, inputs: dict, shard_id: str, held_column: bool, split_column: str,
                 excluded: list[str]) -> tuple[list[str], bool]:  # fmt: skip
    """Pass 0: keys of the shard that may not be a target (held out for the benchmark or in an excluded split),
    and whether any of its records names a given safe pair."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    held = table["held_out"].to_pylist() if held_column else [False] * table.num_rows
    splits = table[split_column].to_pylist()
    blocked = [k for k, h, s in zip(table["key"].to_pylist(), held, splits) if h or s in excluded]
    return blocked, table["given_pair"].null_count < table.num_rows


def plan_shard(root: str, inputs: dict, shard_id: str, index: int, s: dict) -> dict[str, Any]:
    """Pass 1 for one input shard (see the module docstring); ``s`` holds the stage's settings."""
    wd = WorkDir(root)
    table = wd.read_aligned(shard_id, inputs)
    m = s["m"]
    keys, roles = table["key"].to_pylist(), table["role"].to_pylist()
    n = len(keys)
    held = table["held_out"].to_pylist() if s["with_benchmark"] else [False] * n
    splits = table[s["split_column"]].to_pylist()
    blocked = set(pq.read_table(s["blocked"])["key"].to_pylist())
    has_image = table["image_embedding"].is_valid().to_pylist()
    mined = zip(table[f"{m}_targets"].to_pylist(), table[f"{m}_similarities"].to_pylist())
    targets = [[(t, x) for t, x in zip(ts or [], ss or []) if t not in blocked] for ts, ss in mined]
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
    _write(_dir(root, "plan", f"{index:06d}.parquet"), pa.table({"key": keys, "training": status}))
    captions, images = table["caption"].to_pylist(), table["image"].to_pylist()
    urls = table["url"].to_pylist() if "url" in table.column_names else [None] * n
    given, category = table["given_pair"].to_pylist(), table["category"].to_pylist()
    difficulty = table[f"{m}_difficulty"].to_pylist()
    per_group: dict[tuple[str, int], list[dict]] = defaultdict(list)
    requests: dict[int, list[tuple[str, str, int, str]]] = defaultdict(list)
    for i, kind in enumerate(status):
        if kind not in ("quad", "plain"):
            continue
        d = digest(s["seed"], keys[i])
        g = group_of(d, s["groups"][kind])
        row = {"digest": d, "key": keys[i], "shard": index, "caption": captions[i], "image": images[i],
               "url": urls[i]}  # fmt: skip
        if kind == "quad":
            row.update(
                given=given[i],
                category=category[i],
                difficulty=difficulty[i],
                targets=[t for t, _ in targets[i]],
                similarities=[x for _, x in targets[i]],
            )
            for t, _ in targets[i]:
                requests[bucket(t)].append((t, keys[i], g, "target"))
            if given[i] is not None:
                requests[bucket(given[i])].append((given[i], keys[i], g, "given"))
        per_group[(kind, g)].append(row)
    counts = {}
    for (kind, g), rows in per_group.items():
        _write(_dir(root, "samples", f"{kind}-{g:05d}", f"{index:06d}.parquet"), pa.Table.from_pylist(rows))
        counts[f"{kind}-{g}"] = len(rows)
    for b, rows in requests.items():
        need, requester, g, what = (list(c) for c in zip(*rows))
        part = pa.table({"need": need, "requester": requester, "group": pa.array(g, pa.int32()), "what": what})
        _write(_dir(root, "requests", f"{b:03d}", f"{index:06d}.parquet"), part)
    # every record may be asked for (a target or a given pair): its caption, frozen embeddings, image or URL
    dim = table.schema.field("text_embedding").type.list_size
    text, _ = unit_rows(table["text_embedding"], dim)
    image, _ = unit_rows(table["image_embedding"], dim)
    store_rows = np.array([bucket(k) for k in keys], np.int64) if n else np.zeros(0, np.int64)
    for b in np.unique(store_rows):
        at = np.flatnonzero(store_rows == b)
        part = pa.table({
            "key": pa.array([keys[i] for i in at], pa.string()),
            "caption": pa.array([captions[i] for i in at], pa.string()),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text[at].astype(np.float16).reshape(-1)), dim),
            "image_vector": pa.FixedSizeListArray.from_arrays(pa.array(image[at].astype(np.float16).reshape(-1)), dim),
            "image": pa.array([images[i] if s["given_pairs"] else None for i in at], pa.binary()),
            "url": pa.array([urls[i] if s["given_pairs"] else None for i in at], pa.string()),
        })  # fmt: skip
        _write(_dir(root, "store", f"{b:03d}", f"{index:06d}.parquet"), part)
    return {"counts": counts, "status": dict(Counter(status))}


def resolve_bucket(root: str, b: int) -> int:
    """Pass 2: the requests of one hash bucket joined with the records they ask for, written per (group)."""
    folder = _dir(root, "requests", f"{b:03d}")
    if not folder.is_dir():
        return 0
    requests = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    store_dir = _dir(root, "store", f"{b:03d}")
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
        _write(_dir(root, "resolved", f"{g:05d}", f"{b:03d}.parquet"), joined.filter(pa.array(groups == g)))
    return joined.num_rows


def _fetch(root: str, name: str, urls: dict[str, str], options: Any) -> dict[str, tuple[tuple | None, str]]:
    """key -> (where img2dataset put its image: (tar, offset, size), or None and why not) for these URLs. Only the
    places are kept: the tar writer reads each image when it writes it, so a task holds one fetched image at a
    time however many its tars take."""
    if not urls:
        return {}
    folder = _dir(root, "fetch", name)
    shutil.rmtree(folder, ignore_errors=True)
    index = download.run_attempt(folder, urls, options)
    out = {}
    for row in index.to_pylist():
        if row["status"] == "success":
            out[row["key"]] = ((row["tar"], row["offset"], row["size"]), "")
        else:
            out[row["key"]] = (None, f"download {row['status']}: {row['error'] or ''}".strip())
    return out


class FetchedImages:
    """The fetched images of one tar group, read from img2dataset's tars when their samples are written: one open
    file per img2dataset tar (not one open per image), one image in memory at a time."""

    def __init__(self, fetched: dict[str, tuple[tuple | None, str]]):
        self.fetched, self.files = fetched, {}

    def __contains__(self, key: str) -> bool:
        return key in self.fetched

    def get(self, key: str) -> tuple[bytes | None, str]:
        """The image of ``key`` (None and why where it was not fetched)."""
        where, why = self.fetched.get(key, (None, ""))
        if where is None:
            return None, why
        tar, offset, size = where
        if tar not in self.files:
            self.files[tar] = open(tar, "rb")  # noqa: SIM115 - closed by close(), after the group's last sample
        handle = self.files[tar]
        handle.seek(offset)
        return handle.read(size), ""

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


def write_group(root: str, kind: str, g: int, first_tar: int, s: dict, options: Any) -> dict[str, Any]:
    """Pass 3: the tars of one (kind, group), numbered from ``first_tar``; returns their stats."""
    import webdataset as wds

    folder = _dir(root, "samples", f"{kind}-{g:05d}")
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).to_pylist()
    rows.sort(key=lambda r: (r["digest"], r["key"]))
    # the requested records: vectors stay numpy rows (as Python lists they would take ~25x the memory)
    asked: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    parts = sorted(_dir(root, "resolved", f"{g:05d}").glob("*.parquet")) if kind == "quad" else []
    resolved = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    info: dict[str, list] = {}
    vectors: dict[str, np.ndarray] = {}
    if resolved is not None:
        for i, (requester, what) in enumerate(zip(resolved["requester"].to_pylist(), resolved["what"].to_pylist())):
            asked[requester][what].append(i)
        info = {c: resolved[c].to_pylist() for c in ("need", "caption", "image", "url")}
        for column in ("text", "image_vector"):
            flat = resolved[column].combine_chunks()
            vectors[column] = np.asarray(flat.flatten().to_numpy(), np.float16).reshape(len(flat), -1)
    urls = {r["key"]: r["url"] for r in rows if not r["image"] and r["url"]}
    urls |= {info["need"][i]: info["url"][i] for per in asked.values() for i in per["given"]
             if not info["image"][i] and info["url"][i]}  # fmt: skip
    fetched = FetchedImages(_fetch(root, f"{kind}-{g:05d}", urls, options))
    statuses, stats, tar_index = [], {}, first_tar - 1
    out_dir = Path(root) / "shards" / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = path = None
    open_tar = ExitStack()  # the tar being written: closing it closes the writer, then renames the file
    per_tar: Counter = Counter()
    categories: Counter = Counter()
    difficulties: Counter = Counter()

    def close() -> None:
        if writer is not None:
            open_tar.close()
            entry = {"samples": per_tar["samples"], "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            if kind == "quad":
                entry |= {"categories": dict(sorted(categories.items())),
                          "difficulty": dict(sorted(difficulties.items()))}  # fmt: skip
            stats[path.name] = entry

    written = 0
    for r in rows:
        image, why = r["image"], ""
        if not image and r["key"] in fetched:
            image, why = fetched.get(r["key"])
        if kind == "plain" and not image:
            statuses.append((r["key"], r["shard"], f"safe image not fetched ({why or 'no image'})", None, None))
            continue
        found: dict[str, int] = {}
        targets: list[tuple[str, float]] = []
        if kind == "quad":
            found = {info["need"][i]: i for i in asked[r["key"]]["target"]}
            targets = [(t, x) for t, x in zip(r["targets"], r["similarities"]) if t in found]
            if not targets:  # every target left the data after mining: no quadruplet
                statuses.append((r["key"], r["shard"], "unsafe without admissible targets", None, None))
                continue
        if written % s["samples_per_shard"] == 0:
            close()
            tar_index += 1
            path = out_dir / f"{kind}-{tar_index:06d}.tar"
            tmp = open_tar.enter_context(atomic_path(path))
            writer = open_tar.enter_context(
                wds.TarWriter(str(tmp), mtime=0, user="saferclip", group="saferclip", mode=0o444)
            )
            per_tar.clear(), categories.clear(), difficulties.clear()
        order = written
        written += 1
        per_tar["samples"] += 1
        tar = f"{kind}/{path.name}"
        if kind == "plain":
            writer.write({"__key__": r["key"], image_extension(image): image, "txt": r["caption"]})
            statuses.append((r["key"], r["shard"], "plain", tar, order))
            continue
        rows_of = [found[t] for t, _ in targets]
        pair = None
        if asked[r["key"]]["given"]:
            i = asked[r["key"]]["given"][0]
            given_image = info["image"][i] or fetched.get(info["need"][i])[0]
            pair = (info["need"][i], info["caption"][i], given_image)
        category, difficulty = r["category"] or "unknown", r["difficulty"] or "unknown"
        described = [(t, x, info["caption"][found[t]]) for t, x in targets]
        text, image_vectors = vectors["text"][rows_of], vectors["image_vector"][rows_of]
        writer.write(quad_sample(r["key"], r["caption"], image, described, text, image_vectors, pair, category,
                                 difficulty, s["modality"]))  # fmt: skip
        categories[category] += 1
        difficulties[difficulty] += 1
        statuses.append((r["key"], r["shard"], "quad" if image or not why else f"quad without its image ({why})",
                         tar, order))  # fmt: skip
    close()
    fetched.close()
    keys, shards, status, tars, orders = (list(c) for c in zip(*statuses)) if statuses else ([],) * 5
    _write(_dir(root, "status", f"{kind}-{g:05d}.parquet"),
           pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shards, pa.int32()),
                     "training": pa.array(status, pa.string()), "tar": pa.array(tars, pa.string()),
                     "order": pa.array(orders, pa.int64())}))  # fmt: skip
    return {"stats": stats, "tars": tar_index - first_tar + 1, "samples": written, **worker_identity()}


def output_shard(root: str, shard_id: str, index: int, inputs: dict, metadata: dict[str, str]) -> dict[str, Any]:
    """Pass 4: the stage output of one input shard, with the final status of its samples."""
    wd = WorkDir(root)
    table = wd.read_aligned(shard_id, inputs)
    plan = pq.read_table(_dir(root, "plan", f"{index:06d}.parquet"))
    status = dict(zip(plan["key"].to_pylist(), plan["training"].to_pylist()))
    tar: dict[str, str] = {}
    for path in sorted(_dir(root, "status").glob("*.parquet")):
        for r in pq.read_table(path, filters=[("shard", "=", index)]).to_pylist():
            status[r["key"]], tar[r["key"]] = r["training"], r["tar"]
    keys = table["key"].to_pylist()
    out = pa.table({"key": table["key"], "role": table["role"],
                    "training": pa.array([status[k] for k in keys], pa.string()),
                    "tar": pa.array([tar.get(k) for k in keys], pa.string())})  # fmt: skip
    return write_global_shard(wd, "shards", metadata, shard_id, out, [], len(keys), worker_identity())


def run_tasks(ctx: GlobalContext, shard_ids: list[str], inputs: dict, s: dict, options: Any) -> dict[str, Any]:
    """Passes 0-4 (see the module docstring); returns the stage's counts and the training status counts."""
    root = str(ctx.workdir.root)
    shutil.rmtree(_dir(root), ignore_errors=True)
    _dir(root).mkdir(parents=True)
    light = {stage: tuple(c for c in cols if c not in ("image_embedding", "text_embedding", "image"))
             for stage, cols in inputs.items()}  # fmt: skip
    blocked = ctx.map(blocked_keys, [(root, light, sid, s["with_benchmark"], s["split_column"], s["excluded"])
                                     for sid in shard_ids])  # fmt: skip
    s["blocked"] = str(_dir(root, "blocked.parquet"))
    _write(Path(s["blocked"]), pa.table({"key": pa.array([k for keys, _ in blocked for k in keys], pa.string())}))
    s["given_pairs"] = any(given for _, given in blocked)
    plans = ctx.map(plan_shard, [(root, inputs, sid, i, s) for i, sid in enumerate(shard_ids)])
    ctx.map(resolve_bucket, [(root, b) for b in range(BUCKETS)])
    groups = [(kind, g) for kind in ("quad", "plain") for g in range(s["groups"][kind])
              if any(p["counts"].get(f"{kind}-{g}") for p in plans)]  # fmt: skip
    first, tars_so_far = [], {"quad": 0, "plain": 0}
    for kind, g in groups:  # a group's tars follow the previous group's (an upper bound: some images may fail)
        first.append(tars_so_far[kind])
        samples = sum(p["counts"].get(f"{kind}-{g}", 0) for p in plans)
        tars_so_far[kind] += -(-samples // s["samples_per_shard"])
    written = ctx.map(write_group, [(root, kind, g, f, s, options) for (kind, g), f in zip(groups, first)])
    stats: dict[str, dict] = {"quad": {}, "plain": {}}
    for (kind, _), result in zip(groups, written):
        stats[kind].update(result["stats"])
    for kind, per_tar in stats.items():
        if per_tar:
            folder = ctx.workdir.stage_dir("shards") / kind
            (folder / "sizes.json").write_text(json.dumps({n: t["samples"] for n, t in sorted(per_tar.items())},
                                                          indent=2) + "\n")  # fmt: skip
            (folder / "stats.json").write_text(json.dumps(dict(sorted(per_tar.items())), indent=2) + "\n")
    _selection(ctx, groups)
    metadata = ctx.stage.output_metadata()
    outputs = ctx.map(output_shard, [(root, sid, i, {k: v for k, v in light.items() if k != "embed"}, metadata)
                                     for i, sid in enumerate(shard_ids)])  # fmt: skip
    ctx.committed(shard_ids)
    records = sum(o["in"] for o in outputs)
    counts: Counter = Counter()
    for sid in shard_ids:
        part = pq.read_table(ctx.workdir.shard_path("shards", sid), columns=["training"])
        counts.update(part["training"].to_pylist())
    for bulky in ("store", "samples", "resolved", "fetch"):  # copies of the data; plans and statuses stay
        shutil.rmtree(_dir(root, bulky), ignore_errors=True)
    return {"counts": {"in": records, "out": records, "rejected": 0}, "training": dict(counts),
            "tasks": [w["node"] for w in written]}  # fmt: skip


def _selection(ctx: GlobalContext, groups: list[tuple[str, int]]) -> None:
    """``selection.parquet`` (key, kind, order, tar) from the groups' status files, written piece by piece."""
    path = ctx.workdir.stage_dir("shards") / "selection.parquet"
    schema = pa.schema([("key", pa.string()), ("kind", pa.string()), ("order", pa.int64()), ("tar", pa.string())])
    offsets = {"quad": 0, "plain": 0}
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for kind, g in groups:
            part = pq.read_table(_dir(str(ctx.workdir.root), "status", f"{kind}-{g:05d}.parquet"))
            part = part.filter(pc.is_valid(part["tar"]))
            order = pc.add(part["order"], offsets[kind])
            offsets[kind] += part.num_rows
            writer.write_table(pa.table({"key": part["key"], "kind": pa.array([kind] * part.num_rows, pa.string()),
                                         "order": order, "tar": part["tar"]}, schema=schema))  # fmt: skip
