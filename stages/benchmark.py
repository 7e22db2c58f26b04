"""The benchmark stage: NSFW-Caps-style highly aligned safe/unsafe quadruplets, disjoint from training.

A candidate is a group of the benchmark split(s) with a safe and an unsafe record that both survived filter,
dedup and mine: (safe image, safe caption, unsafe image, unsafe caption). Kept are candidates whose safe and
unsafe image–caption alignments reach the configured percentiles and whose safe↔unsafe caption similarity is
high (the unsafe caption is a minimal edit of the safe one); then, per category, the most similar captions
first, up to a balanced quota, skipping near-duplicates of what is already selected. Shortfalls are reported.

Disjointness is checked, not assumed: a training record (any record outside the benchmark splits) that shares
a group with a selected quadruplet, or lies within ``leak_threshold`` cosine of one of its four members on image
or text, is listed in ``benchmark/leakage.parquet`` and counted in the datasheet — never silently fixed.

Every record passes through (the stage rejects nothing); selected records carry their ``benchmark_id`` and every
record of a benchmark split is marked ``held_out`` (the shards stage never trains on those).

No process holds the data set: per-shard tasks gather the benchmark splits' rows (with their vectors), the
stage's process draws the quadruplets from them, and the leak check is a map over the shards (each finds every
member's nearest training records in its shard; the stage keeps each member's overall nearest, ties to the
earlier shard and row). Output shards are written by tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import (
    GlobalContext,
    GlobalOutput,
    Stage,
    StageConfig,
    write_global_shard,
)
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet, remove_tree
from saferclip_data.stages.columns import fields, schema, unit_rows
from saferclip_data.stages.knn import knn_search

WORK_DIR = "_tasks"


class BenchmarkConfig(StageConfig):
    size: int = Field(default=1000, gt=0, description="quadruplets to select")
    splits: list[str] = Field(min_length=1, description="values of split_column the benchmark is drawn from")
    split_column: str = "split"
    group_column: str = "group"
    alignment_percentile: float = Field(
        default=50, ge=0, le=100, description="safe and unsafe image-caption alignment at or above this percentile"
    )
    caption_similarity_percentile: float = Field(
        default=50, ge=0, le=100, description="safe<->unsafe caption cosine at or above this percentile"
    )
    min_caption_similarity: float = Field(default=0.0, ge=-1, le=1, description="and at least this cosine")
    duplicate_threshold: float = Field(
        default=0.95, ge=-1, le=1, description="a candidate this close (image or text) to a selected one is skipped"
    )
    leak_threshold: float = Field(
        default=0.95, ge=-1, le=1, description="a training record this close to a benchmark member is a leak"
    )
    leak_neighbours: int = Field(default=4, gt=0, description="training neighbours examined per benchmark member")
    avoid_leaks: bool | None = Field(
        default=None,
        description="true: a candidate with a member within leak_threshold of a training record (image or text) "
        "is not selected, the next one takes its place (counted per category); unset: select, then list leaks",
    )
    backend: str = Field(default="auto", pattern="^(auto|faiss|torch)$")



@dataclass
class Candidate:
    group: str
    category: str
    safe_row: int
    unsafe_row: int
    safe_alignment: float
    unsafe_alignment: float
    caption_similarity: float
    image_similarity: float


def quotas(size: int, categories: list[str]) -> dict[str, int]:
    """A balanced quota per category: size // n each, the remainder one by one in sorted category order."""
    ordered = sorted(categories)
    base, extra = divmod(size, len(ordered))
    return {c: base + (i < extra) for i, c in enumerate(ordered)}


def select(
    candidates: list[Candidate], quota: dict[str, int], vectors: dict[str, np.ndarray], duplicate_threshold: float
) -> tuple[list[int], dict[str, int]]:
    """Greedy per category, most similar captions first (ties: group); a candidate whose safe or unsafe member
    is within ``duplicate_threshold`` of a member already selected (image or text) is skipped. Returns selected
    candidate indices and the near-duplicates skipped per category."""
    chosen: list[int] = []
    skipped = {c: 0 for c in quota}
    # members selected so far, per modality, in a preallocated matrix (2 rows per quadruplet)
    members = {m: np.empty((2 * sum(quota.values()), v.shape[1]), v.dtype) for m, v in vectors.items()}
    filled = 0
    for category in sorted(quota):
        order = sorted(
            (i for i, c in enumerate(candidates) if c.category == category),
            key=lambda i: (-candidates[i].caption_similarity, candidates[i].group),
        )
        taken = 0
        for i in order:
            if taken >= quota[category]:
                break
            rows = (candidates[i].safe_row, candidates[i].unsafe_row)
            if filled and any(
                float(np.max(members[m][:filled] @ vectors[m][list(rows)].T)) >= duplicate_threshold for m in vectors
            ):
                skipped[category] += 1
                continue
            for m in vectors:
                members[m][filled : filled + 2] = vectors[m][list(rows)]
            filled += 2
            chosen.append(i)
            taken += 1
    return chosen, skipped


class BenchmarkStage(Stage):
    name = "benchmark"
    Config = BenchmarkConfig
    mode = "global"
    inputs = {
        "mine": ("key", "role", "category"),
        "score": ("key", "alignment"),
        "embed": ("key", "image_embedding", "text_embedding"),
    }
    output_columns = ("key", "role", "category", "benchmark_id", "held_out")
    version = "1"

    config: BenchmarkConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields(*self.output_columns))

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        c = self.config
        wd = ctx.workdir
        shard_ids = wd.completed_shards("mine")
        source_cols = ("key", c.split_column, c.group_column)
        missing = [col for col in source_cols[1:] if col not in wd.shard_columns("source", shard_ids[0])]
        if missing:
            raise UserError(
                f"stages.benchmark: the source has no column '{missing[0]}' (set split_column/group_column)"
            )
        return _run_tasks(ctx, self, shard_ids, {**self.inputs, "source": source_cols})

    @staticmethod
    def vectors(table: pa.Table) -> dict[str, np.ndarray]:
        dim = table.schema.field("text_embedding").type.list_size
        return {m: unit_rows(table[f"{m}_embedding"], dim)[0] for m in ("image", "text")}

    def choose(self, table: pa.Table, vectors: dict[str, np.ndarray],
               near_training: Callable[[list[Candidate]], set[str]] | None = None,
               ) -> tuple[list[Candidate], list[dict], dict, dict]:  # fmt: skip
        """The quadruplets drawn from ``table``'s rows of the benchmark splits: (selected, their rows with ids
        and keys, per-category counts, thresholds). With ``avoid_leaks``, ``near_training`` names the groups of the
        eligible candidates that have a member within ``leak_threshold`` of a training record: those are skipped."""
        c = self.config
        candidates = self._candidates(table, vectors)
        if not candidates:
            raise UserError(
                f"stages.benchmark: no group of split(s) {', '.join(c.splits)} has both a safe and an unsafe record "
                "left after filtering"
            )
        eligible, cuts = self._thresholds(candidates)
        near: set[str] = set()
        if c.avoid_leaks and near_training is not None:
            near = near_training([candidates[i] for i in eligible])
            eligible = [i for i in eligible if candidates[i].group not in near]
        categories = sorted({cand.category for cand in candidates})
        quota = quotas(c.size, categories)
        picked, skipped = select([candidates[i] for i in eligible], quota, vectors, c.duplicate_threshold)
        selected = [candidates[eligible[i]] for i in picked]
        selected.sort(key=lambda cand: (cand.category, -cand.caption_similarity, cand.group))
        keys = table["key"].to_pylist()
        rows = [{"benchmark_id": f"bench-{n:05d}", **cand.__dict__, "safe_key": keys[cand.safe_row],
                 "unsafe_key": keys[cand.unsafe_row]} for n, cand in enumerate(selected)]  # fmt: skip
        per_category = {
            cat: {
                "candidates": sum(cand.category == cat for cand in candidates),
                "eligible": sum(candidates[i].category == cat for i in eligible),
                "quota": quota[cat],
                "selected": sum(cand.category == cat for cand in selected),
                "near_duplicates_skipped": skipped[cat],
                **({"near_training_skipped": sum(cand.category == cat and cand.group in near for cand in candidates)}
                   if c.avoid_leaks else {}),  # fmt: skip
            }
            for cat in categories
        }
        for counts in per_category.values():
            counts["shortfall"] = counts["quota"] - counts["selected"]
        return selected, rows, per_category, cuts

    def _candidates(self, table: pa.Table, vectors: dict[str, np.ndarray]) -> list[Candidate]:
        c = self.config
        roles, splits = table["role"].to_pylist(), table[c.split_column].to_pylist()
        groups, categories = table[c.group_column].to_pylist(), table["category"].to_pylist()
        keys, alignment = table["key"].to_pylist(), table["alignment"].to_pylist()
        wanted = set(c.splits)
        by_group: dict[str, dict[str, int]] = {}
        for row in sorted(range(len(keys)), key=lambda r: keys[r]):  # first safe / unsafe by key
            if splits[row] in wanted and roles[row] in ("safe", "unsafe"):
                by_group.setdefault(groups[row], {}).setdefault(roles[row], row)
        out = []
        for group in sorted(by_group):
            pair = by_group[group]
            if "safe" not in pair or "unsafe" not in pair:
                continue
            s, u = pair["safe"], pair["unsafe"]
            if alignment[s] is None or alignment[u] is None:
                continue  # text-only or image-only records cannot be benchmark quadruplets
            out.append(
                Candidate(
                    group,
                    categories[u] or "unknown",
                    s,
                    u,
                    float(alignment[s]),
                    float(alignment[u]),
                    float(vectors["text"][s] @ vectors["text"][u]),
                    float(vectors["image"][s] @ vectors["image"][u]),
                )
            )
        return out

    def _thresholds(self, candidates: list[Candidate]) -> tuple[list[int], dict[str, float]]:
        c = self.config
        safe_cut = float(np.percentile([x.safe_alignment for x in candidates], c.alignment_percentile))
        unsafe_cut = float(np.percentile([x.unsafe_alignment for x in candidates], c.alignment_percentile))
        sim_cut = max(
            c.min_caption_similarity,
            float(np.percentile([x.caption_similarity for x in candidates], c.caption_similarity_percentile)),
        )
        eligible = [
            i
            for i, x in enumerate(candidates)
            if x.safe_alignment >= safe_cut and x.unsafe_alignment >= unsafe_cut and x.caption_similarity >= sim_cut
        ]
        cuts = {"safe_alignment": safe_cut, "unsafe_alignment": unsafe_cut, "caption_similarity": sim_cut}
        return eligible, {k: round(v, 6) for k, v in cuts.items()}



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
    """The leak check's task: :func:`leaks_in_shard` over one shard, the members read from their file."""
    members = dict(np.load(settings["members"]))
    return leaks_in_shard(WorkDir(root).read_aligned(shard_id, inputs), members, settings, index)


def leaks_in_shard(table: pa.Table, members: dict[str, np.ndarray], settings: dict, index: int) -> dict[str, list]:
    """A shard's training records in a benchmark group (``settings["groups"]``: group -> benchmark id), and per
    modality and member (rows of ``members``) the shard's ``k`` nearest training records at or above the
    threshold: (member, score, shard index, row, key)."""
    splits = table[settings["split_column"]].to_pylist()
    training = np.array([s not in settings["splits"] for s in splits], bool)
    keys, groups = table["key"].to_pylist(), table[settings["group_column"]].to_pylist()
    bench_groups = settings["groups"]
    group_leaks = [(bench_groups[groups[r]], keys[r]) for r in np.flatnonzero(training) if groups[r] in bench_groups]
    near: dict[str, list] = {}
    rows = np.flatnonzero(training)
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


def merge_leaks(found: list[dict[str, list]], members: list[tuple[str, str]], k: int) -> list[dict]:
    """The leakage rows from every shard's :func:`leaks_in_shard`: group clashes, then per modality each member's
    (``members``: benchmark id and key, in member order) ``k`` nearest over all shards (ties: earlier shard, row)."""
    leaks = [{"benchmark_id": qid, "benchmark_key": None, "modality": "group", "training_key": key, "cosine": None}
             for part in found for qid, key in part["groups"]]  # fmt: skip
    for modality in ("image", "text"):
        per_member: dict[int, list] = {}
        for part in found:
            for member, score, shard, row, key in part["near"][modality]:
                per_member.setdefault(member, []).append((-score, shard, row, key))
        for member, (qid, member_key) in enumerate(members):
            for neg, _, _, key in sorted(per_member.get(member, []))[:k]:
                leaks.append({"benchmark_id": qid, "benchmark_key": member_key, "modality": modality,
                              "training_key": key, "cosine": round(-neg, 6)})  # fmt: skip
    return leaks


def output_shard(root: str, inputs: dict, shard_id: str, bench_id: dict[str, str], split_column: str,
                 splits: list[str], metadata: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    wd = WorkDir(root)
    table = wd.read_aligned(shard_id, inputs)
    keys = table["key"].to_pylist()
    part = table.select(["key", "role", "category"])
    part = part.append_column("benchmark_id", pa.array([bench_id.get(k) for k in keys], pa.string()))
    part = part.append_column("held_out", pa.array([s in splits for s in table[split_column].to_pylist()]))
    return write_global_shard(wd, "benchmark", metadata, shard_id, part, [], len(keys))


def _leak_search(ctx: GlobalContext, config: BenchmarkConfig, shard_ids: list[str], inputs: dict,
                 members: dict[str, np.ndarray], groups: dict[str, str], k: int, name: str) -> list[dict]:  # fmt: skip
    """The leak map: every shard against these members (written once to a file the tasks read)."""
    root = str(ctx.workdir.root)
    np.savez(_dir(root) / f"{name}.npz", **members)
    settings = {"split_column": config.split_column, "splits": list(config.splits),
                "group_column": config.group_column, "groups": groups, "members": str(_dir(root) / f"{name}.npz"),
                "k": k, "threshold": config.leak_threshold, "backend": config.backend}  # fmt: skip
    return ctx.map(shard_leaks, [(root, inputs, s, i, settings) for i, s in enumerate(shard_ids)])


def _run_tasks(ctx: GlobalContext, stage: BenchmarkStage, shard_ids: list[str], inputs: dict) -> GlobalOutput:
    """The stage's steps: the splits' rows gathered by tasks, the selection here, the leak check and the output
    shards as maps over the shards."""
    from saferclip_data.stages.benchmark_export import export_benchmark

    c = stage.config
    root = str(ctx.workdir.root)
    remove_tree(_dir(root))
    _dir(root).mkdir(parents=True)
    ctx.map(split_rows, [(root, inputs, s, i, c.split_column, list(c.splits)) for i, s in enumerate(shard_ids)])
    table = pa.concat_tables([pq.read_table(_dir(root) / f"split-{i:06d}.parquet") for i in range(len(shard_ids))])
    vectors = stage.vectors(table)

    def near_training(candidates: list[Candidate]) -> set[str]:
        rows = [r for cand in candidates for r in (cand.safe_row, cand.unsafe_row)]
        found = _leak_search(ctx, c, shard_ids, inputs, {m: v[rows] for m, v in vectors.items()}, {}, 1, "candidates")
        hit = {member // 2 for part in found for near in part["near"].values() for member, *_ in near}
        return {candidates[n].group for n in hit}

    selected, rows, per_category, cuts = stage.choose(table, vectors, near_training)
    members = [(r["benchmark_id"], row) for r in rows for row in (r["safe_row"], r["unsafe_row"])]
    keys = table["key"].to_pylist()
    member_rows = [row for _, row in members]
    found = _leak_search(ctx, c, shard_ids, inputs, {m: v[member_rows] for m, v in vectors.items()},
                         {r["group"]: r["benchmark_id"] for r in rows}, c.leak_neighbours, "members")  # fmt: skip
    leaks = merge_leaks(found, [(qid, keys[row]) for qid, row in members], c.leak_neighbours)
    metadata = {"selected": str(len(selected)), "leaks": str(len(leaks))}
    export_benchmark(ctx, stage, rows, leaks, per_category, cuts, metadata)
    bench_id = {keys[row]: qid for qid, row in members}
    out_inputs = {"mine": ("key", "role", "category"), "source": ("key", c.split_column)}
    written = ctx.map(output_shard, [(root, out_inputs, s, bench_id, c.split_column, list(c.splits), metadata)
                                     for s in shard_ids])  # fmt: skip
    ctx.committed(shard_ids)
    records = sum(w["in"] for w in written)
    return GlobalOutput({"in": records, "out": records, "rejected": 0}, metadata)
