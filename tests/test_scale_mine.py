"""The mine stage's reuse cap (sorted runs per shard + one merge) against the plain greedy over all pairs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.stage import STAGE_CONFIGS, GlobalContext
from saferclip_data.pipeline.workdir import REJECT_SCHEMA, WorkDir
from saferclip_data.stages import mine
from saferclip_data.stages.mine import MineConfig, MineStage
from saferclip_data.stages.neighbours import NeighboursConfig

MODALITIES = ("text", "image")


def _neighbours(root, shards: int = 4, rows: int = 120, pool: int = 14, seed: int = 0) -> list[str]:
    """A finished neighbours stage: unsafe queries with candidate lists full of tied similarities."""
    wd, rng = WorkDir(root), np.random.default_rng(seed)
    ids = [f"part-{i:05d}" for i in range(shards)]
    for s, shard in enumerate(ids):
        columns: dict[str, list] = {"key": [], "role": [], "category": [], "given_pair": []}
        for m in MODALITIES:
            columns |= {f"{m}_candidates": [], f"{m}_similarities": [], f"{m}_pair_similarity": []}
        for i in rng.permutation(rows):
            unsafe = rng.random() < 0.7
            columns["key"].append(f"q{s}-{i:04d}")
            columns["role"].append("unsafe" if unsafe else "safe")
            columns["category"].append("violence" if unsafe else None)
            columns["given_pair"].append(None)
            for m in MODALITIES:
                n = int(rng.integers(0, 12)) if unsafe else 0
                cands = [f"t{j:03d}" for j in rng.choice(pool, n, replace=False)]
                sims = sorted(np.round(rng.uniform(0.5, 0.9, n), 1).tolist(), reverse=True)  # ties on purpose
                columns[f"{m}_candidates"].append(cands if unsafe else None)
                columns[f"{m}_similarities"].append(sims if unsafe else None)
                columns[f"{m}_pair_similarity"].append(float(rng.uniform(0.3, 0.6)) if unsafe and n else None)
        table = pa.table(columns).cast(pa.schema([
            ("key", pa.string()), ("role", pa.string()), ("category", pa.string()), ("given_pair", pa.string()),
            *[f for m in MODALITIES for f in ((f"{m}_candidates", pa.list_(pa.string())),
              (f"{m}_similarities", pa.list_(pa.float32())), (f"{m}_pair_similarity", pa.float32()))]]))  # fmt: skip
        stats = {"shard": shard, "in": rows, "out": rows, "rejected": 0, "seconds": 0.0, "metadata": {}}
        wd.write_shard("neighbours", shard, table, REJECT_SCHEMA.empty_table(), stats, {})
    wd.write_manifest("neighbours", {"stage": "neighbours", "complete": True, "shards": ids})
    return ids


def _mine(root, **config) -> tuple[dict, pa.Table, pa.Table, pa.Table, dict]:
    wd = WorkDir(root)
    wd.reset_stage("mine")
    stage = MineStage(MineConfig(**config), {STAGE_CONFIGS: {"neighbours": NeighboursConfig(modalities=MODALITIES)}})
    ctx = GlobalContext(stage, wd)
    output = stage.run_global(ctx)
    out = pa.concat_tables([wd.read_shard("mine", s) for s in ctx.shards])
    long = pq.read_table(wd.stage_dir("mine") / "targets.parquet")
    return output.counts, out, long, wd.rejects("mine"), output.metadata, wd.partials("mine")


def _greedy(neighbours: pa.Table, m: str, k: int, cap: int | None) -> dict[str, list[tuple[str, float]]]:
    """The reuse cap written the plain way: every (query, candidate) pair in memory, best similarity first."""
    rows = [r for r in neighbours.to_pylist() if r["role"] == "unsafe" and r[f"{m}_candidates"]]
    if cap is None:
        return {r["key"]: list(zip(r[f"{m}_candidates"][:k], r[f"{m}_similarities"][:k])) for r in rows}
    pairs = sorted((-s, r["key"], t) for r in rows for t, s in zip(r[f"{m}_candidates"], r[f"{m}_similarities"]))
    used, chosen = {}, {}
    for neg, key, target in pairs:
        if len(chosen.setdefault(key, [])) < k and used.get(target, 0) < cap:
            chosen[key].append((target, -neg))
            used[target] = used.get(target, 0) + 1
    return {key: picks for key, picks in chosen.items() if picks}


@pytest.mark.parametrize("cap", [2, 5, None])
def test_mine_applies_the_greedy_reuse_cap_over_every_shard(tmp_path, monkeypatch, cap):
    ids = _neighbours(tmp_path)
    monkeypatch.setattr(mine, "FLUSH_PICKS", 37)  # picks leave the merge in many pieces
    counts, out, long, rejects, metadata, partials = _mine(tmp_path, k=3, reuse_cap=cap)
    neighbours = pa.concat_tables([WorkDir(tmp_path).read_shard("neighbours", s) for s in ids])
    rows = {r["key"]: r for r in out.to_pylist()}
    for m in MODALITIES:
        expected = _greedy(neighbours, m, 3, cap)
        got = {k: list(zip(r[f"{m}_targets"], r[f"{m}_similarities"])) for k, r in rows.items() if r[f"{m}_targets"]}
        assert got.keys() == expected.keys()
        for key, picks in expected.items():
            assert [t for t, _ in got[key]] == [t for t, _ in picks], key
            assert np.allclose([s for _, s in got[key]], [s for _, s in picks], atol=1e-6)
        assert f"{m}_difficulty_tertiles" in metadata
        in_long = long.filter(pa.compute.equal(long["modality"], m))
        assert in_long.num_rows == sum(len(p) for p in expected.values())
    unsafe = [r for r in neighbours.to_pylist() if r["role"] == "unsafe"]
    without = {r["key"] for r in unsafe if not any(r["key"] in _greedy(neighbours, m, 3, cap) for m in MODALITIES)}
    assert set(rejects["key"].to_pylist()) == without and counts["rejected"] == len(without) > 0
    assert counts["in"] == neighbours.num_rows and counts["out"] == len(rows)
    # a kept record without targets in one modality is listed with the reason, never silently
    partial = partials.to_pylist()
    assert counts["partial"] == len(partial) > 0
    for p in partial:
        modality = p["reason"].split()[1]
        assert rows[p["key"]][f"{modality}_targets"] is None and p["reason"].startswith(f"no {modality} target: ")
    missing = {(k, m) for k, r in rows.items() for m in MODALITIES if r["role"] == "unsafe" and not r[f"{m}_targets"]}
    assert missing == {(p["key"], p["reason"].split()[1]) for p in partial}
    if cap is not None:  # the cap binds: some target is used exactly cap times, none more
        uses = pa.compute.value_counts(long.filter(pa.compute.equal(long["modality"], "text"))["target"])
        assert max(u["counts"].as_py() for u in uses) == cap
