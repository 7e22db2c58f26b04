"""The dedup stage: near-duplicate removal on image and/or text embeddings, within each role.

Safe records are compared with safe ones and unsafe with unsafe (an unsafe edit is *meant* to be close to its
safe source). Clustering is greedy and deterministic: records are visited in key order; an unvisited record is
kept and every unvisited record within the threshold among its ``neighbours`` nearest becomes its duplicate,
rejected with reason ``near-duplicate`` and ``of KEY (image cosine 0.981)`` as the error text. Leader clustering
(rather than connected components) means a rejected record is always within the threshold of the record that
was kept for it; chains A~B~C do not merge A and C.

The steps (the search ones in :mod:`.partitions`), each a set of tasks whatever the data set's size:

1. ``sample_shard``: a seeded sample of every shard's vectors, per role and modality.
2. k-means (faiss, spherical) on the sample, in the stage's process: about ``partition_rows`` records a
   partition, so a role smaller than that is one partition and its search is exact over all pairs.
3. ``assign_shard``: each shard's vectors to their nearest centroid (and the second within ``spill_margin``),
   written sorted by partition.
4. ``search_bucket``: runs of partitions within ``task_rows``, exact top-k inside each; edges written out.
5. The leader rule over the edges only (:func:`leader_over_edges`): memory grows with the duplicates.
6. ``write_dedup_shard``: each output shard, written by a task, in the shards of the input.

A pair split over two partitions (and not caught by the spill) is missed: ``bench scale`` and the tests
measure the recall against an all-pairs search.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

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
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet, remove_tree
from saferclip_data.stages.columns import fields, schema
from saferclip_data.stages.dedup.partitions import (
    EDGE_SCHEMA,
    ROLES,
    assign_shard,
    buckets,
    partition_dir,
    sample_shard,
    search_bucket,
)
from saferclip_data.stages.knn import train_centroids

Node = TypeVar("Node")


class DedupConfig(StageConfig):
    by: list[Literal["image", "text"]] = Field(
        default_factory=lambda: ["image"], min_length=1, description="embeddings that define a near-duplicate"
    )
    image_threshold: float = Field(default=0.96, ge=-1, le=1, description="image cosine at or above = duplicate")
    text_threshold: float = Field(default=0.98, ge=-1, le=1, description="caption cosine at or above = duplicate")
    neighbours: int = Field(default=16, gt=0, description="neighbours examined per record")
    backend: Literal["auto", "faiss", "torch"] = "auto"
    partition_rows: int = Field(
        default=5_000, gt=0, description="mean records per k-means partition; a role this small or smaller is "
        "searched exactly over all pairs (set it above the role size for an exact search at any size)",
    )
    kmeans_sample: int = Field(default=200_000, gt=0, description="records sampled to train k-means")
    kmeans_iterations: int = Field(default=20, gt=0, description="k-means iterations")
    seed: int = Field(default=0, description="seed of the sample and of k-means")
    spill_margin: float = Field(
        default=0.02, ge=0, le=2,
        description="a record also joins its second-nearest partition when that centroid is within this cosine "
        "of the nearest",
    )  # fmt: skip
    task_rows: int = Field(default=500_000, gt=0, description="records per search task (bounds a worker's memory)")

    RUNTIME_FIELDS = StageConfig.RUNTIME_FIELDS | {"backend", "task_rows"}


def greedy_leaders(
    order: Iterable[Node], claims: Callable[[Node], Iterable[tuple[Node, str]]]
) -> dict[Node, tuple[Node, str]]:
    """The leader rule: visit ``order``; an undecided node is kept and claims every undecided node that
    ``claims(node)`` names, in that order, as its duplicate (with the reason given). Returns duplicate -> (kept,
    why). Chains do not merge: a duplicate is always named by the record kept for it."""
    decided: dict[Node, tuple[Node, str]] = {}
    kept: set[Node] = set()
    for node in order:
        if node in decided or node in kept:
            continue
        kept.add(node)
        for other, why in claims(node):
            if other not in decided and other not in kept:
                decided[other] = (node, why)
    return decided


def leader_over_edges(edges: pa.Table, modalities: list[str]) -> dict[str, tuple[str, str]]:
    """Duplicate key -> (kept key, why): the leader rule in key order, each visited record claiming its undecided
    neighbours modality by modality in ``modalities`` order, most similar first (ties: key), over the edges only
    (a record without an edge is kept and affects nobody)."""
    graph: dict[str, set[tuple[int, float, str]]] = defaultdict(set)  # a set: a spilled pair is found twice
    rank = {m: i for i, m in enumerate(modalities)}
    for m, key, other, sim in zip(*(edges[c].to_pylist() for c in ("modality", "key", "other", "similarity"))):
        graph[key].add((rank[m], -sim, other))
    nodes = sorted(set(graph) | {o for targets in graph.values() for _, _, o in targets})

    def claims(key: str) -> Iterable[tuple[str, str]]:
        return ((other, f"{modalities[m]} cosine {-neg:.3f}") for m, neg, other in sorted(graph.get(key, ())))

    return greedy_leaders(nodes, claims)


def decisions_table(decided: dict[str, tuple[str, str]], edges: pa.Table, shard_ids: list[str]) -> pa.Table:
    """One row per duplicate (its kept record and why) and per kept record that absorbed others, by shard."""
    shard_of = dict(zip(edges["key"].to_pylist(), (shard_ids[i] for i in edges["key_shard"].to_pylist())))
    shard_of.update(zip(edges["other"].to_pylist(), (shard_ids[i] for i in edges["other_shard"].to_pylist())))
    absorbed: dict[str, int] = defaultdict(int)
    for kept, _ in decided.values():
        absorbed[kept] += 1
    rows = [(shard_of[k], k, kept, why, 0) for k, (kept, why) in decided.items()]
    rows += [(shard_of[k], k, None, None, n) for k, n in absorbed.items()]
    rows.sort(key=lambda r: (r[0], r[1]))
    names = ("shard", "key", "kept", "why", "absorbed")
    columns = list(zip(*rows)) if rows else [[] for _ in names]
    types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.int32())
    return pa.table({n: pa.array(list(c), t) for n, c, t in zip(names, columns, types)})


def write_dedup_shard(root: str, stage: str, metadata: dict[str, str], shard_id: str,
                      decisions_path: str) -> dict[str, Any]:  # fmt: skip
    """Step 6: one shard's output from the decisions: kept rows with how many they absorbed, the rest rejected."""
    table = WorkDir(root).read_shard("filter", shard_id, ["key", "role", "category"])
    decisions = pq.read_table(decisions_path, filters=[("shard", "=", shard_id)]).to_pylist()
    duplicate_of = {d["key"]: (d["kept"], d["why"]) for d in decisions if d["kept"] is not None}
    absorbed = {d["key"]: d["absorbed"] for d in decisions if d["kept"] is None}
    keys = table["key"].to_pylist()
    keep = [i for i, k in enumerate(keys) if k not in duplicate_of]
    rejects = [Reject(k, "near-duplicate", f"of {duplicate_of[k][0]} ({duplicate_of[k][1]})")
               for k in keys if k in duplicate_of]  # fmt: skip
    out = table.take(pa.array(keep, pa.int64()))
    out = out.append_column("duplicates", pa.array([absorbed.get(keys[i], 0) for i in keep], pa.int32()))
    return write_global_shard(WorkDir(root), stage, metadata, shard_id, out, rejects, table.num_rows)  # fmt: skip


class DedupStage(Stage):
    name = "dedup"
    Config = DedupConfig
    mode = "global"
    inputs = {"filter": ("key", "role", "category"), "embed": ("key", "image_embedding", "text_embedding")}
    output_columns = ("key", "role", "category", "duplicates")
    version = "2"

    config: DedupConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields(*self.output_columns))

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        c = self.config
        root, stage = str(ctx.workdir.root), self.name
        shard_ids = ctx.workdir.completed_shards("filter")
        total = sum((ctx.workdir.shard_stats("filter", s) or {}).get("out", 0) for s in shard_ids)
        folder = partition_dir(root, stage)
        remove_tree(folder)
        folder.mkdir(parents=True)
        inputs = {"filter": ("key", "role"), "embed": ("key", *(f"{m}_embedding" for m in c.by))}
        self._centroids(ctx, shard_ids, inputs, min(1.0, c.kmeans_sample / max(1, total)))
        counts = ctx.map(assign_shard, [(root, stage, inputs, s, i, list(c.by), c.spill_margin)
                                        for i, s in enumerate(shard_ids)])  # fmt: skip
        results = ctx.map(search_bucket, self._searches(root, counts))
        edges = pa.concat_tables([pq.read_table(r["path"]) for r in results]) if results else EDGE_SCHEMA.empty_table()
        decided = leader_over_edges(edges, list(c.by))
        decisions = folder / "decisions.parquet"
        atomic_write_parquet(decisions, decisions_table(decided, edges, shard_ids))
        for role in ROLES:  # the sorted vector copies are no longer needed; edges and decisions stay for audit
            for m in c.by:
                remove_tree(folder / f"{role}-{m}")
        written = ctx.map(write_dedup_shard, [(root, stage, {}, s, str(decisions))
                                              for s in shard_ids])  # fmt: skip
        ctx.committed(shard_ids)
        ctx.workdir.write_task_log(stage, "partitions", [{k: r[k] for k in ("path", "edges", "rows", "largest",
                                                                            "pid", "node")} for r in results])
        records_in = sum(w["in"] for w in written)
        return GlobalOutput({"in": records_in, "out": records_in - len(decided), "rejected": len(decided),
                             "partition_tasks": len(results),
                             "largest_partition": max((r["largest"] for r in results), default=0)})

    def _centroids(self, ctx: GlobalContext, shard_ids: list[str], inputs: dict, fraction: float) -> None:
        """Steps 1-2: k-means centroids per role and modality from a seeded sample of every shard."""
        c, root = self.config, str(ctx.workdir.root)
        folder = partition_dir(root, self.name)
        samples = ctx.map(sample_shard, [(root, inputs, s, i, fraction, c.seed, list(c.by))
                                         for i, s in enumerate(shard_ids)])  # fmt: skip
        for role in ROLES:
            for modality in c.by:
                sample = [part[f"{role}/{modality}"] for part in samples if len(part[f"{role}/{modality}"])]
                centroids = np.ones((1, 1), np.float32)
                if sample:
                    sample = np.concatenate(sample)
                    partitions = math.ceil(len(sample) / fraction / c.partition_rows)
                    centroids = train_centroids(sample, partitions, c.seed, c.kmeans_iterations)
                np.save(folder / f"centroids-{role}-{modality}.npy", centroids)

    def _searches(self, root: str, counts: list[dict[str, np.ndarray]]) -> list[tuple]:
        """Step 4's tasks: runs of partitions within ``task_rows``, with each shard's slice of them."""
        c, out = self.config, []
        for role in ROLES:
            for modality in c.by:
                name = f"{role}-{modality}"
                per_shard = [part[name] for part in counts]
                threshold = c.image_threshold if modality == "image" else c.text_threshold
                starts = [np.concatenate([[0], np.cumsum(n)]) for n in per_shard]
                for lo, hi in buckets(np.sum(per_shard, axis=0), c.task_rows):
                    slices = [(i, int(start[lo]), n[lo:hi].tolist()) for i, (start, n) in
                              enumerate(zip(starts, per_shard)) if start[hi] > start[lo]]  # fmt: skip
                    out.append((root, self.name, name, lo, hi, slices, threshold, c.neighbours, c.backend))
        return out
