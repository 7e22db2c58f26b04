"""The shards stage's steps (plan per shard, hash join, tars per group) against what the mine and source stages
say each sample must hold: statuses, admissible targets, captions, tar sizes and the selection index."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe
from helpers import safety_recipe

pytestmark = pytest.mark.slow


def _samples(folder) -> dict[str, dict]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            out[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


def test_shards_write_every_training_record_with_its_admissible_targets(tmp_path, cli_module):
    data = safety_recipe(tmp_path / "work", mine={"reuse_cap": 3})
    data["stages"]["shards"] = {"samples_per_shard": 20, "exclude_splits": ["test"]}
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
    assert code == 0, err
    wd = WorkDir(tmp_path / "work")
    folder = wd.stage_dir("shards")
    samples = {kind: _samples(folder / kind) for kind in ("quad", "plain")}
    assert len(samples["quad"]) >= 20 and len(samples["plain"]) >= 20
    status = dict(zip(*wd.read_stage_columns("shards", ["key", "training"]).to_pydict().values()))
    source = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "caption", "split", "role"]).to_pylist()}
    mined = {r["key"]: r for r in wd.read_stage_columns("mine", ["key", "role", "text_targets"]).to_pylist()}
    assert status.keys() == mined.keys()
    for kind in ("quad", "plain"):
        assert {k for k, s in status.items() if s == kind} == set(samples[kind])
    excluded = {k for k in mined if source[k]["split"] == "test"}
    assert excluded and all(status[k] == "split test excluded" for k in excluded)
    for key, sample in samples["quad"].items():
        meta = json.loads(sample["json"])
        admissible = [t for t in mined[key]["text_targets"] if t not in excluded]
        assert [t["key"] for t in meta["targets"]] == admissible, key
        assert [t["caption"] for t in meta["targets"]] == [source[t]["caption"] for t in admissible]
        assert sample["unsafe.txt"].decode() == source[key]["caption"] and mined[key]["role"] == "unsafe"
    for key, sample in samples["plain"].items():
        assert sample["txt"].decode() == source[key]["caption"] and mined[key]["role"] == "safe"
    for kind in ("quad", "plain"):
        sizes = json.loads((folder / kind / "sizes.json").read_text())
        assert sum(sizes.values()) == len(samples[kind]) and max(sizes.values()) <= 20
    chosen = pq.read_table(folder / "selection.parquet").to_pylist()
    assert {r["key"] for r in chosen} == set(samples["quad"]) | set(samples["plain"])
    assert all(r["tar"].startswith(r["kind"] + "/") for r in chosen)
