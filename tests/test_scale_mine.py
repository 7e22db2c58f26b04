"""The streaming reuse cap (sorted runs + one merge) against the in-memory greedy: the same mine output."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.stage import GlobalContext
from saferclip_data.pipeline.workdir import REJECT_SCHEMA, WorkDir
from saferclip_data.stages import mine_stream
from saferclip_data.stages.mine import MineConfig, MineStage

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
    stage = MineStage(MineConfig(**config), {})
    ctx = GlobalContext(stage, wd)
    counts = stage.run_global(ctx)
    out = pa.concat_tables([wd.read_shard("mine", s) for s in ctx.shards])
    long = pq.read_table(wd.stage_dir("mine") / "targets.parquet")
    return counts, out, long, wd.rejects("mine"), stage.output_metadata(), wd.partials("mine")


@pytest.mark.parametrize("cap", [2, 5, None])
def test_streaming_mine_equals_the_in_memory_greedy(tmp_path, monkeypatch, cap):
    _neighbours(tmp_path)
    monkeypatch.setattr(mine_stream, "FLUSH_PICKS", 37)  # picks leave the merge in many pieces
    memory = _mine(tmp_path, k=3, reuse_cap=cap, method="memory")
    streaming = _mine(tmp_path, k=3, reuse_cap=cap, method="streaming")
    assert memory[0] == streaming[0] and memory[0]["rejected"] > 0  # some queries have no candidate at all
    assert memory[1].equals(streaming[1])
    assert memory[2].equals(streaming[2].replace_schema_metadata(memory[2].schema.metadata))
    assert memory[3].equals(streaming[3])
    assert memory[4] == streaming[4]
    assert memory[5].equals(streaming[5])
    # a kept record without targets in one modality is listed with the reason, never silently
    partial = memory[5].to_pylist()
    assert memory[0]["partial"] == len(partial) > 0
    rows = {r["key"]: r for r in memory[1].to_pylist()}
    for p in partial:
        modality = p["reason"].split()[1]
        assert rows[p["key"]][f"{modality}_targets"] is None and p["reason"].startswith(f"no {modality} target: ")
    missing = {(k, m) for k, r in rows.items() for m in MODALITIES if r["role"] == "unsafe" and not r[f"{m}_targets"]}
    assert missing == {(p["key"], p["reason"].split()[1]) for p in partial}
    if cap is not None:  # the cap binds: some target is used exactly cap times, none more
        uses = pa.compute.value_counts(memory[2].filter(pa.compute.equal(memory[2]["modality"], "text"))["target"])
        assert max(u["counts"].as_py() for u in uses) == cap
