"""Partitioned (k-means) dedup against the exact all-pairs path, on a synthetic pool with planted duplicates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from saferclip_data.bench.scale import SyntheticPool, write_pool
from saferclip_data.pipeline.stage import GlobalContext
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.dedup import DedupConfig, DedupStage, leader_clusters
from saferclip_data.stages.semdedup import EDGE_SCHEMA, buckets, leader_over_edges


def _run(root, **config) -> dict[str, str]:
    """Run dedup on the work dir; duplicate key -> the key it was judged a duplicate of."""
    wd = WorkDir(root)
    wd.reset_stage("dedup")
    stage = DedupStage(DedupConfig(**config), {})
    ctx = GlobalContext(stage, wd)
    counts = stage.run_global(ctx)
    records = sum(wd.shard_stats("dedup", s)["in"] for s in ctx.shards)
    assert counts["in"] == counts["out"] + counts["rejected"] == records
    wd.write_manifest("dedup", {"stage": "dedup", "complete": True, "shards": ctx.shards})
    return {r["key"]: r["error"].split()[1] for r in wd.rejects("dedup").to_pylist()}


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


def test_partitioned_dedup_finds_the_exact_pairs_and_the_planted_ones(pool):
    root, planted = pool
    exact = _run(root, method="exact")
    assert len(exact) >= 0.8 * len(planted)  # most planted copies collapse (some onto each other's original)
    partitioned = _run(root, method="partitioned", partition_rows=2_000, task_rows=5_000)
    tasks = len(WorkDir(root).task_log("dedup", "partitions"))
    assert tasks >= 2, "the search was split into several tasks"
    assert _recall(exact, partitioned) >= 0.99
    assert _recall(planted, partitioned) >= 0.99 * _recall(planted, exact)
    # nothing found that exact search does not find: every partitioned decision is one of exact's pairs
    assert _recall(partitioned, exact) >= 0.99


def test_one_partition_gives_the_exact_result(pool):
    root, _ = pool
    wd = WorkDir(root)
    exact = _run(root, method="exact", by=["image", "text"])
    table_exact = wd.read_stage_columns("dedup", ["key", "role", "category", "duplicates"])
    one = _run(root, method="partitioned", by=["image", "text"], partition_rows=10**9, spill_margin=0)
    assert one == exact
    assert wd.read_stage_columns("dedup", ["key", "role", "category", "duplicates"]).equals(table_exact)


def test_auto_stays_exact_below_its_size(pool):
    root, _ = pool
    _run(root)
    assert not WorkDir(root).task_log("dedup", "partitions")
    _run(root, exact_max_rows=1_000, partition_rows=4_000)
    assert WorkDir(root).task_log("dedup", "partitions")


def test_buckets_cover_every_partition_within_the_row_budget():
    counts = np.array([5, 0, 7, 3, 12, 0, 1])
    got = buckets(counts, max_rows=10)
    assert got == [(0, 2), (2, 4), (4, 5), (5, 7)]  # a partition over the budget runs alone
    assert sum(int(counts[a:b].sum()) for a, b in got) == counts.sum()


def test_leader_over_edges_equals_leader_clusters_on_a_random_graph():
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in rng.permutation(60)]
    graphs, rows = [], []
    for modality in ("image", "text"):
        graph: dict[int, list[tuple[int, float]]] = {}
        for q in range(60):
            others = sorted(set(rng.integers(0, 60, 3).tolist()) - {q})
            sims = sorted(rng.uniform(0.95, 1.0, len(others)).round(4).tolist(), reverse=True)
            if others and rng.random() < 0.4:
                graph[q] = list(zip(others, sims))
                rows += [(modality, keys[q], keys[o], s, 0, 0) for o, s in zip(others, sims)]
        graphs.append((modality, graph))
    expected = {keys[d]: (keys[k], why) for d, (k, why) in leader_clusters(keys, graphs).items()}
    edges = pa.Table.from_pylist([dict(zip(EDGE_SCHEMA.names, r)) for r in rows], schema=EDGE_SCHEMA)
    got = leader_over_edges(edges, ["image", "text"])
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}
