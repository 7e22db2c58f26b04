"""The dedup stage (k-means partitions searched exactly) against an all-pairs search written in the test, on a
synthetic pool with planted duplicates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from saferclip_data.bench.scale import SyntheticPool, write_pool
from saferclip_data.pipeline.stage import GlobalContext
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.columns import unit_rows
from saferclip_data.stages.dedup import DedupConfig, DedupStage, leader_over_edges
from saferclip_data.stages.dedup.partitions import EDGE_SCHEMA, buckets


def _run(root, **config) -> dict[str, str]:
    """Run dedup on the work dir; duplicate key -> the key it was judged a duplicate of."""
    wd = WorkDir(root)
    wd.reset_stage("dedup")
    stage = DedupStage(DedupConfig(**config), {})
    ctx = GlobalContext(stage, wd)
    counts = stage.run_global(ctx).counts
    records = sum(wd.shard_stats("dedup", s)["in"] for s in ctx.shards)
    assert counts["in"] == counts["out"] + counts["rejected"] == records
    wd.write_manifest("dedup", {"stage": "dedup", "complete": True, "shards": ctx.shards})
    return {r["key"]: r["error"].split()[1] for r in wd.rejects("dedup").to_pylist()}


def _all_pairs(root, by: list[str], neighbours: int = 16, threshold: float = 0.96) -> dict[str, str]:
    """The leader rule over every record's ``neighbours`` nearest within its role, found by comparing it with every
    other record (numpy, in blocks): duplicate key -> the key it is a duplicate of."""
    wd = WorkDir(root)
    table = wd.read_stage_columns("filter", ["key", "role"])
    embed = wd.read_stage_columns("embed", ["key", *(f"{m}_embedding" for m in by)])
    assert embed["key"].equals(table["key"])
    keys, roles = table["key"].to_pylist(), np.array(table["role"].to_pylist(), dtype=object)
    edges = []
    for modality in by:
        column = embed[f"{modality}_embedding"]
        vectors, valid = unit_rows(column, column.type.list_size)
        for role in ("safe", "unsafe"):
            rows = np.flatnonzero((roles == role) & valid)
            matrix = vectors[rows]
            for start in range(0, len(rows), 2_000):
                sims = matrix[start : start + 2_000] @ matrix.T
                sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -2  # not its own duplicate
                # a row's `neighbours` largest, ties broken by position (a stable sort's first ones): every
                # entry at or above its k-th largest value is a candidate; only those over the threshold count
                kth = -np.partition(-sims, neighbours - 1, axis=1)[:, neighbours - 1]
                for q in np.flatnonzero((sims >= np.maximum(kth, threshold)[:, None]).any(axis=1)):
                    line = sims[q]
                    candidates = np.flatnonzero(line >= kth[q])
                    best = candidates[np.lexsort((candidates, -line[candidates]))][:neighbours]
                    edges += [(modality, keys[rows[start + q]], keys[rows[j]], float(line[j]), 0, 0)
                              for j in best if line[j] >= threshold]  # fmt: skip
    edges = pa.Table.from_pylist([dict(zip(EDGE_SCHEMA.names, e)) for e in edges], schema=EDGE_SCHEMA)
    return {dup: kept for dup, (kept, _) in leader_over_edges(edges, by).items()}


def _recall(reference: dict[str, str], got: dict[str, str]) -> float:
    """Share of the reference's duplicate pairs that ``got`` also puts under one kept record."""

    def rep(key: str) -> str:
        return got.get(key, key)

    return sum(rep(dup) == rep(kept) for dup, kept in reference.items()) / len(reference)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    planted = write_pool(root, SyntheticPool(rows=24_000, dim=64, shard_rows=4_000, clusters=60, seed=3))
    return root, planted


def test_partitioned_dedup_finds_the_all_pairs_duplicates_and_the_planted_ones(pool):
    root, planted = pool
    exact = _all_pairs(root, ["image"])
    assert len(exact) >= 0.8 * len(planted)  # most planted copies collapse (some onto each other's original)
    partitioned = _run(root, partition_rows=2_000, task_rows=5_000)
    tasks = len(WorkDir(root).task_log("dedup", "partitions"))
    assert tasks >= 2, "the search was split into several tasks"
    assert _recall(exact, partitioned) >= 0.99
    assert _recall(planted, partitioned) >= 0.99 * _recall(planted, exact)
    # nothing found that the all-pairs search does not find: every decision is one of its pairs
    assert _recall(partitioned, exact) >= 0.99


def test_one_partition_gives_the_all_pairs_result(pool):
    root, _ = pool
    exact = _all_pairs(root, ["image", "text"], threshold=0.96)
    one = _run(root, by=["image", "text"], text_threshold=0.96, partition_rows=10**9, spill_margin=0)
    assert len(WorkDir(root).task_log("dedup", "partitions")) == 4  # one whole-role search per role and modality
    assert one == exact


def test_buckets_cover_every_partition_within_the_row_budget():
    counts = np.array([5, 0, 7, 3, 12, 0, 1])
    got = buckets(counts, max_rows=10)
    assert got == [(0, 2), (2, 4), (4, 5), (5, 7)]  # a partition over the budget runs alone
    assert sum(int(counts[a:b].sum()) for a, b in got) == counts.sum()
