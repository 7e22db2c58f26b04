"""The benchmark stage as tasks: no process holds the data set.

The selection needs only the rows of the benchmark splits: per-shard tasks write those (with their vectors)
and the stage's process draws the quadruplets from them, as the in-process path does. The leak check is a map
over the shards: each finds, for every benchmark member, its nearest training records in that shard (and the
training records of a benchmark group); the stage keeps each member's overall nearest (ties to the earlier
shard and row, as the exact search breaks them) at or above the threshold. Output shards are written by tasks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline.executors import worker_identity
from saferclip_data.pipeline.stage import GlobalContext, write_global_shard
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet
from saferclip_data.stages.knn import knn_search
from saferclip_data.stages.score import unit_rows

WORK_DIR = "_tasks"


def _dir(root: str) -> Path:
    return Path(root) / "benchmark" / WORK_DIR


def split_rows(root: str, inputs: dict, shard_id: str, index: int, split_column: str, splits: list[str]) -> int:
    """Write this shard's rows of the benchmark splits (with their vectors); returns how many."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    table = table.filter(pc.fill_null(pc.is_in(table[split_column], pa.array(splits)), False))
    _dir(root).mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(_dir(root) / f"split-{index:06d}.parquet", table)
    return table.num_rows


def shard_leaks(root: str, inputs: dict, shard_id: str, index: int, settings: dict) -> dict[str, list]:
    """This shard's training records in a benchmark group, and per modality and member the shard's nearest
    training records at or above the threshold: (member, score, shard index, row, key)."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    splits = table[settings["split_column"]].to_pylist()
    training = np.array([s not in settings["splits"] for s in splits], bool)
    keys, groups = table["key"].to_pylist(), table[settings["group_column"]].to_pylist()
    bench_groups = settings["groups"]
    group_leaks = [(bench_groups[groups[r]], keys[r]) for r in np.flatnonzero(training) if groups[r] in bench_groups]
    near: dict[str, list] = {}
    rows = np.flatnonzero(training)
    members = np.load(settings["members"])
    dim = table.schema.field("text_embedding").type.list_size
    for modality in ("image", "text"):
        near[modality] = []
        if not len(rows) or not len(members[modality]):
            continue
        matrix = unit_rows(table[f"{modality}_embedding"], dim)[0][rows]
        k = min(settings["k"], len(rows))
        scores, idx = knn_search(members[modality], matrix, k, backend=settings["backend"])
        for member, (s_row, i_row) in enumerate(zip(scores, idx)):
            near[modality] += [(member, float(s), index, int(rows[i]), keys[rows[i]])
                               for s, i in zip(s_row, i_row) if i >= 0 and s >= settings["threshold"]]  # fmt: skip
    return {"groups": group_leaks, "near": near}


def output_shard(root: str, inputs: dict, shard_id: str, bench_id: dict[str, str], split_column: str,
                 splits: list[str], metadata: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    wd = WorkDir(root)
    table = wd.read_aligned(shard_id, inputs)
    keys = table["key"].to_pylist()
    part = table.select(["key", "role", "category"])
    part = part.append_column("benchmark_id", pa.array([bench_id.get(k) for k in keys], pa.string()))
    part = part.append_column("held_out", pa.array([s in splits for s in table[split_column].to_pylist()]))
    return write_global_shard(wd, "benchmark", metadata, shard_id, part, [], len(keys), worker_identity())


def run_tasks(ctx: GlobalContext, stage: Any, shard_ids: list[str], inputs: dict) -> dict[str, int]:
    from saferclip_data.stages.benchmark_export import export_benchmark

    c = stage.config
    root = str(ctx.workdir.root)
    shutil.rmtree(_dir(root), ignore_errors=True)
    _dir(root).mkdir(parents=True)
    ctx.map(split_rows, [(root, inputs, s, i, c.split_column, list(c.splits)) for i, s in enumerate(shard_ids)])
    pieces = [pq.read_table(_dir(root) / f"split-{i:06d}.parquet") for i in range(len(shard_ids))]
    table = pa.concat_tables(pieces)
    vectors = stage.vectors(table)
    light = {**inputs, "source": (*inputs["source"],)}

    def search(member_rows: list[int], groups: dict[str, str], k: int, name: str) -> list[dict]:
        """The leak map: every training shard against these members (rows of ``table``)."""
        np.savez(_dir(root) / f"{name}.npz", **{m: vectors[m][member_rows] for m in vectors})
        settings = {"split_column": c.split_column, "splits": list(c.splits), "group_column": c.group_column,
                    "groups": groups, "members": str(_dir(root) / f"{name}.npz"), "k": k,
                    "threshold": c.leak_threshold, "backend": c.backend}  # fmt: skip
        return ctx.map(shard_leaks, [(root, light, s, i, settings) for i, s in enumerate(shard_ids)])

    def near_training(candidates: list) -> set[str]:
        found = search([r for cand in candidates for r in (cand.safe_row, cand.unsafe_row)], {}, 1, "candidates")
        hit = {member // 2 for part in found for near in part["near"].values() for member, *_ in near}
        return {candidates[n].group for n in hit}

    selected, rows, per_category, cuts = stage.choose(table, vectors, near_training)
    members = [(r["benchmark_id"], row) for r in rows for row in (r["safe_row"], r["unsafe_row"])]
    keys = table["key"].to_pylist()
    found = search([row for _, row in members], {r["group"]: r["benchmark_id"] for r in rows}, c.leak_neighbours,
                   "members")  # fmt: skip
    leaks = [{"benchmark_id": qid, "benchmark_key": None, "modality": "group", "training_key": key, "cosine": None}
             for part in found for qid, key in part["groups"]]  # fmt: skip
    for modality in ("image", "text"):
        per_member: dict[int, list] = {}
        for part in found:
            for member, score, shard, row, key in part["near"][modality]:
                per_member.setdefault(member, []).append((-score, shard, row, key))
        for member, (qid, row) in enumerate(members):
            for neg, _, _, key in sorted(per_member.get(member, []))[: c.leak_neighbours]:
                leaks.append({"benchmark_id": qid, "benchmark_key": keys[row], "modality": modality,
                              "training_key": key, "cosine": round(-neg, 6)})  # fmt: skip
    stage.summary = {"selected": len(selected), "leaks": len(leaks), "thresholds": cuts}
    export_benchmark(ctx, stage, rows, leaks, per_category, cuts)
    bench_id = {keys[row]: qid for qid, row in members}
    metadata = stage.output_metadata()
    out_inputs = {"mine": ("key", "role", "category"), "source": ("key", c.split_column)}
    written = ctx.map(output_shard, [(root, out_inputs, s, bench_id, c.split_column, list(c.splits), metadata)
                                     for s in shard_ids])  # fmt: skip
    ctx.committed(shard_ids)
    records = sum(w["in"] for w in written)
    return {"in": records, "out": records, "rejected": 0}
