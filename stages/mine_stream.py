"""The mine stage's reuse cap over a stream: the same greedy choice as ``apply_reuse_cap``, never holding all
(query, candidate) pairs in one process.

1. ``sorted_run`` (a task per neighbours shard): the shard's pairs of one modality, sorted the way the greedy
   visits them (similarity descending, then query key, then target key), written as a run file.
2. The merge (the stage's own process): the runs are read batch by batch and merged (``heapq.merge``); the
   greedy keeps only what it must (targets' use counts, queries' pick counts, each query's top-1 similarity
   for the difficulty tertiles) and writes the picks out in pieces, per shard of their query.
3. ``assemble_shard`` (a task per shard): the shard's picks become its output rows, as the in-memory path
   builds them.

The result equals the in-memory path's; only the ``targets`` table is written in row groups, piece by piece.
"""

from __future__ import annotations

import heapq
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.executors import worker_identity
from saferclip_data.pipeline.stage import GlobalContext, Reject, write_global_shard
from saferclip_data.pipeline.workdir import WorkDir, atomic_path, atomic_write_parquet
from saferclip_data.stages.curriculum import bucket_of, difficulty

RUN_DIR = "_runs"
PAIR_SCHEMA = pa.schema([("similarity", pa.float32()), ("key", pa.string()), ("target", pa.string())])
LONG_SCHEMA = pa.schema([("key", pa.string()), ("modality", pa.string()), ("rank", pa.int32()),
                         ("target", pa.string()), ("similarity", pa.float32())])  # fmt: skip
#: picks buffered in the merge before they are written out, and pairs read from a run at a time (as Python
#: tuples: with one run per shard, a 2M-record build held 2.6M of them at 65,536 a run)
FLUSH_PICKS = 200_000
RUN_BATCH = 4_096


def _folder(root: str) -> Path:
    return Path(root) / "mine" / RUN_DIR


def sorted_run(root: str, shard_id: str, index: int, modality: str) -> int:
    """Write this shard's (similarity, query, target) pairs of one modality in greedy order; returns their count."""
    table = WorkDir(root).read_shard("neighbours", shard_id, ["key", "role", f"{modality}_candidates",
                                                              f"{modality}_similarities"])  # fmt: skip
    rows: list[tuple[float, str, str]] = []
    for key, role, cands, sims in zip(*(table[c].to_pylist() for c in table.column_names)):
        if role == "unsafe" and cands:
            rows.extend((s, key, t) for t, s in zip(cands, sims))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    columns = list(zip(*rows)) if rows else [[], [], []]
    out = _folder(root) / modality
    out.mkdir(parents=True, exist_ok=True)
    arrays = [pa.array(column, field.type) for column, field in zip(columns, PAIR_SCHEMA)]
    atomic_write_parquet(out / f"{index:06d}.parquet", pa.table(arrays, schema=PAIR_SCHEMA), row_group_size=RUN_BATCH)
    return len(rows)


def _run_rows(path: Path, index: int) -> Iterator[tuple[float, str, str, int]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=RUN_BATCH):
        sims, keys, targets = (batch.column(i).to_pylist() for i in range(3))
        yield from ((-s, k, t, index) for s, k, t in zip(sims, keys, targets))


def greedy_merge(root: str, modality: str, shards: int, k: int, cap: int) -> np.ndarray:
    """Merge the modality's runs and pick under the cap; picks go to ``_runs/<modality>-picks/<shard>-<n>``.
    Returns every picked query's top-1 similarity (for the tertiles)."""
    runs = _folder(root) / modality
    picks_dir = _folder(root) / f"{modality}-picks"
    picks_dir.mkdir(parents=True, exist_ok=True)
    used: dict[str, int] = defaultdict(int)
    taken: dict[str, int] = defaultdict(int)
    top1: list[float] = []
    buffers: dict[int, list[tuple[str, str, float]]] = defaultdict(list)
    buffered = flushes = 0

    def flush() -> None:
        nonlocal buffered, flushes
        for shard, picks in buffers.items():
            columns = list(zip(*picks))
            table = pa.table({"key": pa.array(columns[0], pa.string()), "target": pa.array(columns[1], pa.string()),
                              "similarity": pa.array(columns[2], pa.float32())})  # fmt: skip
            atomic_write_parquet(picks_dir / f"{shard:06d}-{flushes:05d}.parquet", table)
        buffers.clear()
        buffered, flushes = 0, flushes + 1

    streams = [_run_rows(runs / f"{i:06d}.parquet", i) for i in range(shards)]
    for neg_sim, key, target, shard in heapq.merge(*streams):
        if taken[key] < k and used[target] < cap:
            if taken[key] == 0:
                top1.append(-neg_sim)
            taken[key] += 1
            used[target] += 1
            buffers[shard].append((key, target, -neg_sim))
            buffered += 1
            if buffered >= FLUSH_PICKS:
                flush()
    flush()
    return np.array(top1, np.float64)


def assemble_shard(root: str, shard_id: str, index: int, modalities: list[str], k: int, capped: bool,
                   tertiles: dict[str, tuple[float, float]], metadata: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """One mine output shard (and its piece of the long targets table) from the shard's picks."""
    wd = WorkDir(root)
    table = wd.read_shard("neighbours", shard_id)
    keys, roles = table["key"].to_pylist(), table["role"].to_pylist()
    out: dict[str, pa.Array] = {n: table[n] for n in ("key", "role", "category", "given_pair")}
    has_target = np.zeros(len(keys), bool)
    long_rows: list[dict] = []
    missing: dict[int, list[str]] = {}
    for m in modalities:
        candidates = table[f"{m}_candidates"].to_pylist()
        picks: dict[str, list[tuple[str, float]]] = defaultdict(list)
        if capped:
            for path in sorted((_folder(root) / f"{m}-picks").glob(f"{index:06d}-*.parquet")):
                piece = pq.read_table(path)
                for key, target, sim in zip(*(piece[c].to_pylist() for c in ("key", "target", "similarity"))):
                    picks[key].append((target, sim))
        else:
            for key, role, cands, sims in zip(keys, roles, table[f"{m}_candidates"].to_pylist(),
                                              table[f"{m}_similarities"].to_pylist()):  # fmt: skip
                if role == "unsafe" and cands:
                    picks[key] = list(zip(cands[:k], sims[:k]))
        pair_sims = table[f"{m}_pair_similarity"].to_pylist()
        targets, sims_col, margins, buckets = [], [], [], []
        low, high = tertiles[m]
        for i, key in enumerate(keys):
            chosen = picks.get(key) if roles[i] == "unsafe" else None
            if not chosen and roles[i] == "unsafe":
                missing.setdefault(i, []).append(partial_reason(m, bool(candidates[i])))
            if not chosen:
                targets.append(None), sims_col.append(None), margins.append(None), buckets.append(None)
                continue
            has_target[i] = True
            targets.append([t for t, _ in chosen])
            sims_col.append([s for _, s in chosen])
            top = chosen[0][1]
            margins.append(top - pair_sims[i] if pair_sims[i] is not None else None)
            buckets.append(bucket_of(top, low, high))
            long_rows.extend({"key": key, "modality": m, "rank": r + 1, "target": t, "similarity": s}
                             for r, (t, s) in enumerate(chosen))  # fmt: skip
        out |= target_columns(m, targets, sims_col, table[f"{m}_pair_similarity"], margins, buckets)
    result = pa.table(out)
    reject = [i for i, r in enumerate(roles) if r == "unsafe" and not has_target[i]]
    keep = np.setdiff1d(np.arange(len(keys)), reject)
    rejects = [Reject(keys[i], "no safe target within constraints", "all candidates excluded or over the reuse cap")
               for i in reject]  # fmt: skip
    long_path = _folder(root) / "long" / f"{index:06d}.parquet"
    long_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(long_path, pa.Table.from_pylist(long_rows, schema=LONG_SCHEMA))
    partial = [Reject(keys[i], why) for i in keep.tolist() if has_target[i] for why in missing.get(i, [])]
    return write_global_shard(wd, "mine", metadata, shard_id, result.take(pa.array(keep, pa.int64())), rejects,
                              len(keys), worker_identity(), partial)  # fmt: skip


def partial_reason(modality: str, had_candidates: bool) -> str:
    """Why a kept unsafe record has no target in one modality (it has some in another)."""
    why = "every candidate is over the reuse cap" if had_candidates else "no admissible candidate"
    return f"no {modality} target: {why}"


def target_columns(m: str, targets: list, similarities: list, pair_similarity: Any, margins: list,
                   buckets: list) -> dict[str, Any]:  # fmt: skip
    """A modality's output columns of the mine stage (None where a record has no target)."""
    return {
        f"{m}_targets": pa.array(targets, pa.list_(pa.string())),
        f"{m}_similarities": pa.array(similarities, pa.list_(pa.float32())),
        f"{m}_pair_similarity": pair_similarity,
        f"{m}_margin": pa.array(margins, pa.float32()),
        f"{m}_difficulty": pa.array(buckets, pa.string()),
    }


def run_streaming(ctx: GlobalContext, shard_ids: list[str], modalities: list[str], k: int,
                  cap: int | None) -> tuple[dict[str, int], dict[str, list[float]]]:  # fmt: skip
    """The whole mine stage as tasks plus one merge; returns its counts and the tertiles per modality."""
    root = str(ctx.workdir.root)
    folder = _folder(root)
    shutil.rmtree(folder, ignore_errors=True)
    tertiles: dict[str, tuple[float, float]] = {}
    for m in modalities:
        if cap is not None:
            ctx.map(sorted_run, [(root, s, i, m) for i, s in enumerate(shard_ids)])
            top1 = greedy_merge(root, m, len(shard_ids), k, cap)
        else:
            top1 = np.concatenate([np.array(t, np.float64) for t in ctx.map(
                first_similarities, [(root, s, m) for s in shard_ids])] or [np.zeros(0)])  # fmt: skip
        tertiles[m] = difficulty(top1)[1]
    # the metadata carries the tertiles, as the in-memory path's does
    thresholds = {m: [round(low, 6), round(high, 6)] for m, (low, high) in tertiles.items()}
    ctx.stage.thresholds = thresholds
    metadata = ctx.stage.output_metadata()
    written = ctx.map(assemble_shard, [(root, s, i, modalities, k, cap is not None, tertiles, metadata)
                                       for i, s in enumerate(shard_ids)])  # fmt: skip
    ctx.committed(shard_ids)
    _write_long_table(ctx, modalities, len(shard_ids), metadata)
    for m in modalities:
        shutil.rmtree(folder / m, ignore_errors=True)
    records = sum(w["in"] for w in written)
    rejected = sum(w["rejected"] for w in written)
    partial = sum(w.get("partial", 0) for w in written)
    return {"in": records, "out": records - rejected, "rejected": rejected, "partial": partial}, thresholds


def first_similarities(root: str, shard_id: str, modality: str) -> list[float]:
    """Without a cap every query's top-1 is its first candidate."""
    table = WorkDir(root).read_shard("neighbours", shard_id, ["role", f"{modality}_similarities"])
    return [sims[0] for role, sims in zip(*(table[c].to_pylist() for c in table.column_names))
            if role == "unsafe" and sims]  # fmt: skip


def _write_long_table(ctx: GlobalContext, modalities: list[str], shards: int, metadata: dict[str, str]) -> None:
    """``targets.parquet`` from the shards' pieces, modality by modality (the in-memory path's row order)."""
    path = ctx.workdir.stage_dir("mine") / "targets.parquet"
    schema = LONG_SCHEMA.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    pieces = _folder(str(ctx.workdir.root)) / "long"
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for m in modalities:
            for i in range(shards):
                part = pq.read_table(pieces / f"{i:06d}.parquet", filters=[("modality", "=", m)])
                if part.num_rows:
                    writer.write_table(part.cast(schema))
