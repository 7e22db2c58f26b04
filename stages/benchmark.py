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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import GlobalContext, Stage, StageConfig
from saferclip_data.stages.knn import knn_search
from saferclip_data.stages.score import unit_rows

#: auto's switch to the task-parallel benchmark (records in the mine stage)
TASKS_MIN_ROWS = 200_000


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
    method: Literal["auto", "memory", "tasks"] | None = Field(
        default=None,
        description="memory = the whole data set in one process; tasks = the splits' rows gathered by per-shard "
        f"tasks, the leak check a map over the training shards; unset = auto: tasks above {TASKS_MIN_ROWS:,} records",
    )


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

    def run_global(self, ctx: GlobalContext) -> dict[str, int]:
        from saferclip_data.stages.benchmark_export import export_benchmark

        c = self.config
        wd = ctx.workdir
        shard_ids = wd.completed_shards("mine")
        source_cols = ("key", c.split_column, c.group_column)
        missing = [col for col in source_cols[1:] if col not in wd.shard_columns("source", shard_ids[0])]
        if missing:
            raise UserError(
                f"stages.benchmark: the source has no column '{missing[0]}' (set split_column/group_column)"
            )
        records = sum((wd.shard_stats("mine", s) or {}).get("out", 0) for s in shard_ids)
        if c.method == "tasks" or (c.method in (None, "auto") and records > TASKS_MIN_ROWS):
            from saferclip_data.stages.benchmark_tasks import run_tasks

            return run_tasks(ctx, self, shard_ids, {**self.inputs, "source": source_cols})
        tables = [wd.read_aligned(s, {**self.inputs, "source": source_cols}) for s in shard_ids]
        table = pa.concat_tables(tables)
        vectors = self.vectors(table)
        selected, rows, per_category, cuts = self.choose(table, vectors, lambda cands: self._near_training(
            table, vectors, cands))  # fmt: skip
        leaks = self._leaks(table, vectors, selected, [r["benchmark_id"] for r in rows])
        self.summary = {"selected": len(selected), "leaks": len(leaks), "thresholds": cuts}
        export_benchmark(ctx, self, rows, leaks, per_category, cuts)
        keys = table["key"].to_pylist()
        bench_id = [None] * len(keys)
        for r in rows:
            bench_id[r["safe_row"]] = bench_id[r["unsafe_row"]] = r["benchmark_id"]
        wanted = set(c.splits)
        held_out = [s in wanted for s in table[c.split_column].to_pylist()]
        start = 0
        for shard_id, shard in zip(shard_ids, tables):
            part = shard.select(["key", "role", "category"]).append_column(
                "benchmark_id", pa.array(bench_id[start : start + shard.num_rows], pa.string())
            )
            part = part.append_column("held_out", pa.array(held_out[start : start + shard.num_rows], pa.bool_()))
            start += shard.num_rows
            ctx.write_shard(shard_id, part, [], shard.num_rows)
        return {"in": len(keys), "out": len(keys), "rejected": 0}

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

    def _near_training(self, table: pa.Table, vectors: dict[str, np.ndarray], candidates: list[Candidate]) -> set[str]:
        """Groups of ``candidates`` with a member within leak_threshold of a training record (image or text)."""
        c = self.config
        wanted = set(c.splits)
        train_rows = np.flatnonzero([s not in wanted for s in table[c.split_column].to_pylist()])
        if not candidates or not len(train_rows):
            return set()
        rows = [r for cand in candidates for r in (cand.safe_row, cand.unsafe_row)]
        closest = np.full(len(rows), -np.inf)
        for matrix in vectors.values():
            scores, _ = knn_search(matrix[rows], matrix[train_rows], 1, backend=c.backend)
            closest = np.maximum(closest, scores[:, 0])
        near = np.maximum(closest[0::2], closest[1::2]) >= c.leak_threshold  # either member of a candidate
        return {cand.group for cand, too_close in zip(candidates, near) if too_close}

    def _leaks(self, table: pa.Table, vectors, selected: list[Candidate], ids: list[str]) -> list[dict]:
        """Training records sharing a group with, or within leak_threshold of, a selected quadruplet's member."""
        c = self.config
        keys, groups = table["key"].to_pylist(), table[c.group_column].to_pylist()
        splits = table[c.split_column].to_pylist()
        wanted = set(c.splits)
        training = np.array([s not in wanted for s in splits])
        leaks: list[dict] = []
        bench_groups = {cand.group: qid for cand, qid in zip(selected, ids)}
        for row in np.flatnonzero(training):
            if groups[row] in bench_groups:
                leaks.append(
                    {"benchmark_id": bench_groups[groups[row]], "benchmark_key": None, "modality": "group",
                     "training_key": keys[row], "cosine": None}
                )  # fmt: skip
        train_rows = np.flatnonzero(training)
        if not selected or len(train_rows) == 0:
            return leaks
        members = [(qid, r) for cand, qid in zip(selected, ids) for r in (cand.safe_row, cand.unsafe_row)]
        k = min(c.leak_neighbours, len(train_rows))
        for modality, matrix in vectors.items():
            scores, idx = knn_search(matrix[[r for _, r in members]], matrix[train_rows], k, backend=c.backend)
            for (qid, row), s_row, i_row in zip(members, scores, idx):
                for s, i in zip(s_row, i_row):
                    if i >= 0 and s >= c.leak_threshold:
                        leaks.append(
                            {"benchmark_id": qid, "benchmark_key": keys[row], "modality": modality,
                             "training_key": keys[train_rows[i]], "cosine": round(float(s), 6)}
                        )  # fmt: skip
        return leaks

    def output_metadata(self) -> dict[str, str]:
        summary = getattr(self, "summary", None)
        return {"selected": str(summary["selected"]), "leaks": str(summary["leaks"])} if summary else {}
