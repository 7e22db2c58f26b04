"""The mine stage: the final proximity-ranked safe targets of every unsafe record, under a global reuse cap.

Input: each unsafe record's admissible candidates from the ``neighbours`` stage. A safe record may serve as a
target at most ``reuse_cap`` times per modality, so one bland caption cannot absorb every unsafe query. The cap is
applied greedily over all (query, candidate) pairs at once, best similarity first, ties broken by query key then
target key: the result depends on the data only, never on shard order or worker count. Each unsafe record gets
up to ``k`` targets with ranks and similarities, its margin over the given (ViSU-style) pair, and a difficulty
bucket from the tertiles of top-1 similarity (easy = most similar, the first curriculum stage); the tertile
thresholds go into the stage metadata. An unsafe record left without any target is rejected with a reason.

The steps, each bounded whatever the data set's size (one shard or a million):

1. ``sorted_run`` (a task per neighbours shard): the shard's pairs of one modality in the greedy's visiting order
   (similarity descending, then query key, then target key), written as a run file.
2. ``greedy_merge`` (the stage's own process): the runs merged batch by batch (``heapq.merge``) through
   :func:`capped_picks`, which keeps only use and pick counters; picks go out in pieces, per shard of their query.
   Without a cap every query keeps its first ``k`` candidates and only the top-1 similarities are gathered.
3. ``assemble_shard`` (a task per shard): the shard's picks become its output rows and its piece of the long
   ``targets`` table, which the driver concatenates modality by modality.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from saferclip_data.pipeline.stage import (
    GlobalContext,
    GlobalOutput,
    Reject,
    Stage,
    StageConfig,
    write_global_shard,
)
from saferclip_data.pipeline.workdir import WorkDir, atomic_path, atomic_write_parquet, remove_tree
from saferclip_data.stages.columns import fields, mined_modalities, schema
from saferclip_data.stages.curriculum import bucket_of, difficulty

RUN_DIR = "_runs"
PAIR_SCHEMA = pa.schema([("similarity", pa.float32()), ("key", pa.string()), ("target", pa.string())])
LONG_SCHEMA = pa.schema([("key", pa.string()), ("modality", pa.string()), ("rank", pa.int32()),
                         ("target", pa.string()), ("similarity", pa.float32())])  # fmt: skip
#: picks buffered in the merge before they are written out, and pairs read from a run at a time (as Python
#: tuples: with one run per shard, a 2M-record build held 2.6M of them at 65,536 a run)
FLUSH_PICKS = 200_000
RUN_BATCH = 4_096
NO_TARGET = "no safe target within constraints"


class MineConfig(StageConfig):
    k: int = Field(default=8, gt=0, description="targets kept per unsafe record and modality")
    reuse_cap: int | None = Field(
        default=None, gt=0, description="most times one safe record may be a target (per modality); null = no cap"
    )


def capped_picks(pairs: Iterable[tuple[float, str, str, Any]], k: int,
                 cap: int) -> Iterator[tuple[str, str, float, Any]]:  # fmt: skip
    """The greedy reuse cap over ``(-similarity, query, target, tag)`` in ascending order (best first): yields
    ``(query, target, similarity, tag)`` for each pick, at most ``k`` per query and ``cap`` per target."""
    used: dict[str, int] = defaultdict(int)
    taken: dict[str, int] = defaultdict(int)
    for neg_sim, key, target, tag in pairs:
        if taken[key] < k and used[target] < cap:
            taken[key] += 1
            used[target] += 1
            yield key, target, -neg_sim, tag


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
    picks_dir = _folder(root) / f"{modality}-picks"
    picks_dir.mkdir(parents=True, exist_ok=True)
    top1: list[float] = []
    seen: set[str] = set()
    buffers: dict[int, list[tuple[str, str, float]]] = defaultdict(list)
    flushes = 0

    def flush() -> None:
        nonlocal flushes
        for shard, picks in buffers.items():
            key, target, sim = zip(*picks)
            table = pa.table({"key": pa.array(key, pa.string()), "target": pa.array(target, pa.string()),
                              "similarity": pa.array(sim, pa.float32())})  # fmt: skip
            atomic_write_parquet(picks_dir / f"{shard:06d}-{flushes:05d}.parquet", table)
        buffers.clear()
        flushes += 1

    streams = [_run_rows(_folder(root) / modality / f"{i:06d}.parquet", i) for i in range(shards)]
    for n, (key, target, sim, shard) in enumerate(capped_picks(heapq.merge(*streams), k, cap), 1):
        if key not in seen:  # picks come best first: a query's first pick is its top-1
            seen.add(key)
            top1.append(sim)
        buffers[shard].append((key, target, sim))
        if n % FLUSH_PICKS == 0:
            flush()
    flush()
    return np.array(top1, np.float64)


def first_similarities(root: str, shard_id: str, modality: str) -> list[float]:
    """Without a cap every query's top-1 is its first candidate."""
    table = WorkDir(root).read_shard("neighbours", shard_id, ["role", f"{modality}_similarities"])
    return [sims[0] for role, sims in zip(*(table[c].to_pylist() for c in table.column_names))
            if role == "unsafe" and sims]  # fmt: skip


def _shard_picks(root: str, table: pa.Table, index: int, m: str, k: int,
                 capped: bool) -> dict[str, list[tuple[str, float]]]:  # fmt: skip
    """Each unsafe query's picks in one modality, best first: from the merge's pieces, or its first k candidates."""
    picks: dict[str, list[tuple[str, float]]] = defaultdict(list)
    if capped:
        for path in sorted((_folder(root) / f"{m}-picks").glob(f"{index:06d}-*.parquet")):
            piece = pq.read_table(path)
            for key, target, sim in zip(*(piece[c].to_pylist() for c in ("key", "target", "similarity"))):
                picks[key].append((target, sim))
        return picks
    for key, role, cands, sims in zip(table["key"].to_pylist(), table["role"].to_pylist(),
                                      table[f"{m}_candidates"].to_pylist(), table[f"{m}_similarities"].to_pylist()):
        if role == "unsafe" and cands:
            picks[key] = list(zip(cands[:k], sims[:k]))
    return picks


def partial_reason(modality: str, had_candidates: bool) -> str:
    """Why a kept unsafe record has no target in one modality (it has some in another)."""
    why = "every candidate is over the reuse cap" if had_candidates else "no admissible candidate"
    return f"no {modality} target: {why}"


def _modality_columns(table: pa.Table, m: str, picks: dict[str, list[tuple[str, float]]],
                      tertiles: tuple[float, float]) -> tuple[dict[str, Any], list[dict], list[bool], list[str | None]]:
    """A modality's output columns, its long-table rows, which rows got a target and why the others did not."""
    keys, roles = table["key"].to_pylist(), table["role"].to_pylist()
    candidates, pair_sims = table[f"{m}_candidates"].to_pylist(), table[f"{m}_pair_similarity"].to_pylist()
    targets, sims_col, margins, buckets, long_rows, missing = [], [], [], [], [], []
    for i, key in enumerate(keys):
        chosen = picks.get(key) if roles[i] == "unsafe" else None
        missing.append(partial_reason(m, bool(candidates[i])) if roles[i] == "unsafe" and not chosen else None)
        if not chosen:
            targets.append(None), sims_col.append(None), margins.append(None), buckets.append(None)
            continue
        targets.append([t for t, _ in chosen])
        sims_col.append([s for _, s in chosen])
        margins.append(chosen[0][1] - pair_sims[i] if pair_sims[i] is not None else None)
        buckets.append(bucket_of(chosen[0][1], *tertiles))
        long_rows.extend({"key": key, "modality": m, "rank": r + 1, "target": t, "similarity": s}
                         for r, (t, s) in enumerate(chosen))  # fmt: skip
    columns = {
        f"{m}_targets": pa.array(targets, pa.list_(pa.string())),
        f"{m}_similarities": pa.array(sims_col, pa.list_(pa.float32())),
        f"{m}_pair_similarity": table[f"{m}_pair_similarity"],
        f"{m}_margin": pa.array(margins, pa.float32()),
        f"{m}_difficulty": pa.array(buckets, pa.string()),
    }
    return columns, long_rows, [t is not None for t in targets], missing


def assemble_shard(root: str, shard_id: str, index: int, modalities: list[str], k: int, capped: bool,
                   tertiles: dict[str, tuple[float, float]], metadata: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """One mine output shard (and its piece of the long targets table) from the shard's picks."""
    wd = WorkDir(root)
    table = wd.read_shard("neighbours", shard_id)
    keys, roles = table["key"].to_pylist(), table["role"].to_pylist()
    out: dict[str, Any] = {n: table[n] for n in ("key", "role", "category", "given_pair")}
    has_target = np.zeros(len(keys), bool)
    long_rows: list[dict] = []
    missing: dict[int, list[str]] = defaultdict(list)
    for m in modalities:
        picks = _shard_picks(root, table, index, m, k, capped)
        columns, rows, got, why = _modality_columns(table, m, picks, tertiles[m])
        out |= columns
        long_rows.extend(rows)
        has_target |= np.array(got, bool)
        for i, reason in enumerate(why):
            if reason:
                missing[i].append(reason)
    reject = [i for i, r in enumerate(roles) if r == "unsafe" and not has_target[i]]
    keep = np.setdiff1d(np.arange(len(keys)), reject)
    rejects = [Reject(keys[i], NO_TARGET, "all candidates excluded or over the reuse cap") for i in reject]
    long_path = _folder(root) / "long" / f"{index:06d}.parquet"
    long_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(long_path, pa.Table.from_pylist(long_rows, schema=LONG_SCHEMA))
    partial = [Reject(keys[i], why) for i in keep.tolist() if has_target[i] for why in missing.get(i, [])]
    return write_global_shard(wd, "mine", metadata, shard_id, pa.table(out).take(pa.array(keep, pa.int64())),
                              rejects, len(keys), partial=partial)  # fmt: skip


class MineStage(Stage):
    name = "mine"
    Config = MineConfig
    mode = "global"
    inputs = {"neighbours": ("key", "role", "category", "given_pair")}
    output_columns = ("key", "role", "category", "given_pair")
    version = "2"

    config: MineConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields("key", "role", "category", "given_pair"),
                      fields("{m}_targets", "{m}_similarities", "{m}_pair_similarity", "{m}_margin", "{m}_difficulty",
                             m=mined_modalities(self.sections)))  # fmt: skip

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        c = self.config
        root, shard_ids = str(ctx.workdir.root), ctx.workdir.completed_shards("neighbours")
        modalities = mined_modalities(self.sections)
        remove_tree(_folder(root))
        tertiles: dict[str, tuple[float, float]] = {}
        for m in modalities:
            if c.reuse_cap is not None:
                ctx.map(sorted_run, [(root, s, i, m) for i, s in enumerate(shard_ids)])
                top1 = greedy_merge(root, m, len(shard_ids), c.k, c.reuse_cap)
            else:
                top1 = np.concatenate([np.array(t, np.float64) for t in ctx.map(
                    first_similarities, [(root, s, m) for s in shard_ids])] or [np.zeros(0)])  # fmt: skip
            tertiles[m] = difficulty(top1)[1]
        metadata = self.metadata(tertiles)
        written = ctx.map(assemble_shard, [(root, s, i, modalities, c.k, c.reuse_cap is not None, tertiles, metadata)
                                           for i, s in enumerate(shard_ids)])  # fmt: skip
        ctx.committed(shard_ids)
        self._write_long_table(ctx, modalities, len(shard_ids), metadata)
        remove_tree(_folder(root))
        records, rejected = sum(w["in"] for w in written), sum(w["rejected"] for w in written)
        partial = sum(w.get("partial", 0) for w in written)
        return GlobalOutput({"in": records, "out": records - rejected, "rejected": rejected, "partial": partial},
                            metadata)

    @staticmethod
    def _write_long_table(ctx: GlobalContext, modalities: list[str], shards: int, metadata: dict[str, str]) -> None:
        """``targets.parquet`` from the shards' pieces, modality by modality, shard by shard."""
        path = ctx.workdir.stage_dir("mine") / "targets.parquet"
        schema = LONG_SCHEMA.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
        pieces = _folder(str(ctx.workdir.root)) / "long"
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for m in modalities:
                for i in range(shards):
                    part = pq.read_table(pieces / f"{i:06d}.parquet", filters=[("modality", "=", m)])
                    if part.num_rows:
                        writer.write_table(part.cast(schema))

    def metadata(self, tertiles: dict[str, tuple[float, float]]) -> dict[str, str]:
        """k, the cap and each modality's difficulty tertiles (rounded to 6 places)."""
        meta = {"k": str(self.config.k), "reuse_cap": str(self.config.reuse_cap)}
        for m, (low, high) in tertiles.items():
            meta[f"{m}_difficulty_tertiles"] = f"{round(low, 6)},{round(high, 6)}"
        return meta
