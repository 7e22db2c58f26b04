"""The mine stage: the final proximity-ranked safe targets of every unsafe record, under a global reuse cap.

Input: each unsafe record's admissible candidates from the ``neighbours`` stage. A safe record may serve as a
target at most ``reuse_cap`` times per modality, so one bland caption cannot absorb every unsafe query. The cap is
applied greedily over all (query, candidate) pairs at once, best similarity first, ties broken by query key then
target key: the result depends on the data only, never on shard order or worker count. Each unsafe record gets
up to ``k`` targets with ranks and similarities, its margin over the given (ViSU-style) pair, and a difficulty
bucket from the tertiles of top-1 similarity (easy = most similar, the first curriculum stage); the tertile
thresholds go into the stage metadata. An unsafe record left without any target is rejected with a reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from saferclip_data.pipeline.stage import GlobalContext, Reject, Stage, StageConfig
from saferclip_data.stages.curriculum import difficulty
from saferclip_data.stages.mine_stream import partial_reason, run_streaming, target_columns
from saferclip_data.stages.score import column_suffix

#: auto's switch to the streaming reuse cap (records in the neighbours stage)
STREAM_MIN_ROWS = 200_000


class MineConfig(StageConfig):
    k: int = Field(default=8, gt=0, description="targets kept per unsafe record and modality")
    reuse_cap: int | None = Field(
        default=None, gt=0, description="most times one safe record may be a target (per modality); null = no cap"
    )
    method: Literal["auto", "memory", "streaming"] | None = Field(
        default=None,
        description="memory = all candidate pairs in one process; streaming = sorted runs per shard merged by "
        f"one greedy pass (same result, bounded memory); unset = auto: streaming above {STREAM_MIN_ROWS:,} records",
    )


def apply_reuse_cap(
    query_keys: list[str], candidates: list[list[str]], sims: list[list[float]], k: int, cap: int | None
) -> list[list[tuple[str, float]]]:
    """Up to k (target, similarity) per query, each target used at most ``cap`` times over all queries.

    Greedy by similarity (descending), then query key, then target key: deterministic and order-free."""
    if cap is None:
        return [list(zip(c[:k], s[:k])) for c, s in zip(candidates, sims)]
    triples = [(-float(s), query_keys[q], t, q) for q in range(len(query_keys)) for t, s in zip(candidates[q], sims[q])]
    triples.sort()
    used: dict[str, int] = defaultdict(int)
    chosen: list[list[tuple[str, float]]] = [[] for _ in query_keys]
    for neg_sim, _, target, q in triples:
        if len(chosen[q]) < k and used[target] < cap:
            chosen[q].append((target, -neg_sim))
            used[target] += 1
    return chosen


class MineStage(Stage):
    name = "mine"
    Config = MineConfig
    mode = "global"
    inputs = {"neighbours": ("key", "role", "category", "given_pair")}
    output_columns = ("key", "role", "category", "given_pair")
    version = "1"

    config: MineConfig

    def run_global(self, ctx: GlobalContext) -> dict[str, int]:
        c = self.config
        shard_ids = ctx.workdir.completed_shards("neighbours")
        total = sum((ctx.workdir.shard_stats("neighbours", s) or {}).get("out", 0) for s in shard_ids)
        if c.method == "streaming" or (c.method in (None, "auto") and total > STREAM_MIN_ROWS):
            columns = ctx.workdir.shard_columns("neighbours", shard_ids[0])
            modalities = [n[: -len("_candidates")] for n in columns if n.endswith("_candidates")]
            counts, self.thresholds = run_streaming(ctx, shard_ids, modalities, c.k, c.reuse_cap)
            return counts
        tables = [ctx.workdir.read_shard("neighbours", s) for s in shard_ids]
        table = pa.concat_tables(tables)
        modalities = [n[: -len("_candidates")] for n in table.column_names if n.endswith("_candidates")]
        keys = table["key"].to_pylist()
        roles = table["role"].to_pylist()
        unsafe = [i for i, r in enumerate(roles) if r == "unsafe"]
        out: dict[str, pa.Array] = {n: table[n] for n in ("key", "role", "category", "given_pair")}
        has_target = np.zeros(len(keys), bool)
        long_rows: list[dict] = []
        self.thresholds: dict[str, list[float]] = {}
        missing: dict[int, list[str]] = {}  # row -> why some modality gave it no target
        for m in modalities:
            cands = table[f"{m}_candidates"].to_pylist()
            sims = table[f"{m}_similarities"].to_pylist()
            pair_sims = table[f"{m}_pair_similarity"].to_pylist()
            queries = [i for i in unsafe if cands[i]]
            chosen = apply_reuse_cap(
                [keys[i] for i in queries], [cands[i] for i in queries], [sims[i] for i in queries], c.k, c.reuse_cap
            )
            targets: list[list[str] | None] = [None] * len(keys)
            target_sims: list[list[float] | None] = [None] * len(keys)
            for i, picks in zip(queries, chosen):
                if picks:
                    targets[i] = [t for t, _ in picks]
                    target_sims[i] = [s for _, s in picks]
                    has_target[i] = True
                    long_rows.extend(
                        {"key": keys[i], "modality": m, "rank": r + 1, "target": t, "similarity": s}
                        for r, (t, s) in enumerate(picks)
                    )
            for i in unsafe:
                if not targets[i]:
                    missing.setdefault(i, []).append(partial_reason(m, bool(cands[i])))
            with_targets = [i for i in range(len(keys)) if targets[i]]
            top1 = np.array([target_sims[i][0] for i in with_targets], np.float64)
            buckets, (low, high) = difficulty(top1)
            self.thresholds[m] = [round(low, 6), round(high, 6)]
            bucket_col: list[str | None] = [None] * len(keys)
            margin: list[float | None] = [None] * len(keys)
            for i, b in zip(with_targets, buckets):
                bucket_col[i] = b
                if pair_sims[i] is not None:
                    margin[i] = target_sims[i][0] - pair_sims[i]
            out |= target_columns(m, targets, target_sims, table[f"{m}_pair_similarity"], margin, bucket_col)
        result = pa.table(out)
        reject_rows = {i for i in unsafe if not has_target[i]}
        start = 0
        for shard_id, shard in zip(shard_ids, tables):
            rows = range(start, start + shard.num_rows)
            start += shard.num_rows
            keep = [r for r in rows if r not in reject_rows]
            rejects = [
                Reject(keys[r], "no safe target within constraints", "all candidates excluded or over the reuse cap")
                for r in rows
                if r in reject_rows
            ]
            partial = [Reject(keys[r], why) for r in keep if has_target[r] for why in missing.get(r, [])]
            ctx.write_shard(shard_id, result.take(pa.array(keep, pa.int64())), rejects, shard.num_rows, partial)
        schema = pa.schema(
            [
                ("key", pa.string()),
                ("modality", pa.string()),
                ("rank", pa.int32()),
                ("target", pa.string()),
                ("similarity", pa.float32()),
            ]
        )
        ctx.write_table("targets", pa.Table.from_pylist(long_rows, schema=schema))
        partial = sum(1 for r, why in missing.items() if has_target[r] for _ in why)
        return {"in": len(keys), "out": len(keys) - len(reject_rows), "rejected": len(reject_rows), "partial": partial}

    def output_metadata(self) -> dict[str, str]:
        thresholds = getattr(self, "thresholds", {})
        meta = {"k": str(self.config.k), "reuse_cap": str(self.config.reuse_cap)}
        for m, (low, high) in thresholds.items():
            meta[f"{column_suffix(m)}_difficulty_tertiles"] = f"{low},{high}"
        return meta
