"""The dedup stage: near-duplicate removal on image and/or text embeddings, within each role.

Safe records are compared with safe ones and unsafe with unsafe (an unsafe edit is *meant* to be close to its
safe source). Clustering is greedy and deterministic: records are visited in key order; an unvisited record is
kept and every unvisited record within the threshold among its ``neighbours`` nearest becomes its duplicate,
rejected with reason ``near-duplicate`` and ``of KEY (image cosine 0.981)`` as the error text. Leader clustering
(rather than connected components) means a rejected record is always within the threshold of the record that
was kept for it; chains A~B~C do not merge A and C.

A whole-data-set stage that writes its output in the shards of its input, so that map stages can follow it.
Above ``exact_max_rows`` records it runs partitioned (:mod:`semdedup`): k-means partitions searched exactly as
parallel tasks, the same leader rule over the edges found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from saferclip_data.pipeline.stage import GlobalContext, Reject, Stage, StageConfig
from saferclip_data.stages.knn import knn_search
from saferclip_data.stages.score import unit_rows
from saferclip_data.stages.semdedup import greedy_leaders, run_partitioned

#: defaults of the partitioned path (unset recipe fields keep the stage's fingerprint as it was before they existed)
EXACT_MAX_ROWS = 200_000
PARTITION_ROWS = 5_000
KMEANS_SAMPLE = 200_000
SPILL_MARGIN = 0.02


@dataclass(frozen=True)
class PartitionSettings:
    by: list[str]
    image_threshold: float
    text_threshold: float
    neighbours: int
    backend: str
    partition_rows: int
    kmeans_sample: int
    kmeans_iterations: int
    seed: int
    task_rows: int
    spill_margin: float


class DedupConfig(StageConfig):
    by: list[Literal["image", "text"]] = Field(
        default_factory=lambda: ["image"], min_length=1, description="embeddings that define a near-duplicate"
    )
    image_threshold: float = Field(default=0.96, ge=-1, le=1, description="image cosine at or above = duplicate")
    text_threshold: float = Field(default=0.98, ge=-1, le=1, description="caption cosine at or above = duplicate")
    neighbours: int = Field(default=16, gt=0, description="neighbours examined per record")
    backend: Literal["auto", "faiss", "torch"] = "auto"
    method: Literal["auto", "exact", "partitioned"] | None = Field(
        default=None,
        description="exact = all pairs within each role; partitioned = k-means partitions searched exactly each "
        "(semantic dedup: misses the few pairs split over two partitions, measured by bench scale); unset = auto: "
        "exact up to exact_max_rows records, partitioned above",
    )
    exact_max_rows: int | None = Field(
        default=None, gt=0, description=f"auto's switch to partitioned (unset: {EXACT_MAX_ROWS:,} records)"
    )
    partition_rows: int | None = Field(
        default=None, gt=0, description=f"partitioned: mean records per k-means partition (unset: {PARTITION_ROWS:,})"
    )
    kmeans_sample: int | None = Field(
        default=None, gt=0, description=f"partitioned: records sampled to train k-means (unset: {KMEANS_SAMPLE:,})"
    )
    kmeans_iterations: int | None = Field(default=None, gt=0, description="partitioned: k-means iterations (20)")
    seed: int | None = Field(default=None, description="partitioned: seed of the sample and k-means (0)")
    spill_margin: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="partitioned: a record also joins its second-nearest partition when "
        f"that centroid is within this cosine of the nearest (unset: {SPILL_MARGIN})",
    )
    task_rows: int = Field(
        default=500_000, gt=0, description="partitioned: records per search task (bounds each worker's memory)"
    )

    RUNTIME_FIELDS = StageConfig.RUNTIME_FIELDS | {"backend", "task_rows"}

    def settings(self) -> PartitionSettings:
        """The partitioned path's settings with their defaults filled in."""
        return PartitionSettings(
            by=list(self.by), image_threshold=self.image_threshold, text_threshold=self.text_threshold,
            neighbours=self.neighbours, backend=self.backend, partition_rows=self.partition_rows or PARTITION_ROWS,
            kmeans_sample=self.kmeans_sample or KMEANS_SAMPLE, kmeans_iterations=self.kmeans_iterations or 20,
            seed=self.seed or 0, task_rows=self.task_rows,
            spill_margin=SPILL_MARGIN if self.spill_margin is None else self.spill_margin,
        )  # fmt: skip


def near_duplicates(
    vectors: np.ndarray, valid: np.ndarray, threshold: float, neighbours: int, backend: str = "auto"
) -> dict[int, tuple[int, float]]:
    """Edges row -> (nearest row within threshold, cosine) from an exact kNN over the valid rows."""
    rows = np.flatnonzero(valid)
    if len(rows) < 2:
        return {}
    sims, idx = knn_search(vectors[rows], vectors[rows], min(neighbours + 1, len(rows)), backend=backend)
    edges: dict[int, list[tuple[int, float]]] = {}
    for qi, (srow, irow) in enumerate(zip(sims, idx)):
        for s, j in zip(srow, irow):
            if j < 0 or j == qi or s < threshold:
                continue
            edges.setdefault(int(rows[qi]), []).append((int(rows[j]), float(s)))
    return edges


def leader_clusters(keys: list[str], edges: list[dict[int, list[tuple[int, float]]]]) -> dict[int, tuple[int, str]]:
    """Duplicate row -> (kept row, why). Greedy in key order, so the result does not depend on row order."""

    def claims(row: int):
        return ((other, f"{m} cosine {sim:.3f}") for m, graph in edges for other, sim in graph.get(row, []))

    return greedy_leaders(sorted(range(len(keys)), key=keys.__getitem__), claims)


class DedupStage(Stage):
    name = "dedup"
    Config = DedupConfig
    mode = "global"
    inputs = {"filter": ("key", "role", "category"), "embed": ("key", "image_embedding", "text_embedding")}
    output_columns = ("key", "role", "category", "duplicates")
    version = "1"

    config: DedupConfig

    def run_global(self, ctx: GlobalContext) -> dict[str, int]:
        c = self.config
        shard_ids = ctx.workdir.completed_shards("filter")
        total = sum((ctx.workdir.shard_stats("filter", s) or {}).get("out", 0) for s in shard_ids)
        method = c.method or "auto"
        if method == "partitioned" or (method == "auto" and total > (c.exact_max_rows or EXACT_MAX_ROWS)):
            return run_partitioned(ctx, c.settings(), shard_ids, total)
        return self._exact(ctx, shard_ids)

    def _exact(self, ctx: GlobalContext, shard_ids: list[str]) -> dict[str, int]:
        """All pairs within each role, the whole data set in this process (the reference path)."""
        c = self.config
        tables = [ctx.workdir.read_aligned(s, self.inputs) for s in shard_ids]
        table = pa.concat_tables(tables)
        keys = table["key"].to_pylist()
        roles = np.array(table["role"].to_pylist(), dtype=object)
        dim = table.schema.field("text_embedding").type.list_size
        duplicate_of: dict[int, tuple[int, str]] = {}
        for role in ("safe", "unsafe"):
            members = np.flatnonzero(roles == role)
            if len(members) < 2:
                continue
            graphs = []
            for modality in c.by:
                vectors, valid = unit_rows(table[f"{modality}_embedding"].take(pa.array(members)), dim)
                threshold = c.image_threshold if modality == "image" else c.text_threshold
                local = near_duplicates(vectors, valid, threshold, c.neighbours, c.backend)
                graphs.append(
                    (modality, {int(members[q]): [(int(members[o]), s) for o, s in e] for q, e in local.items()})
                )
            duplicate_of.update(leader_clusters(keys, [(m, g) for m, g in graphs]) if graphs else {})
        absorbed = np.zeros(len(keys), np.int32)
        for kept_row, _ in duplicate_of.values():
            absorbed[kept_row] += 1
        start = 0
        for shard_id, shard in zip(shard_ids, tables):
            rows = range(start, start + shard.num_rows)
            start += shard.num_rows
            keep = [r for r in rows if r not in duplicate_of]
            rejects = [
                Reject(keys[r], "near-duplicate", f"of {keys[duplicate_of[r][0]]} ({duplicate_of[r][1]})")
                for r in rows
                if r in duplicate_of
            ]
            out = table.select(["key", "role", "category"]).take(pa.array(keep, pa.int64()))
            out = out.append_column("duplicates", pa.array(absorbed[keep], pa.int32()))
            ctx.write_shard(shard_id, out, rejects, shard.num_rows)
        return {"in": len(keys), "out": len(keys) - len(duplicate_of), "rejected": len(duplicate_of)}
