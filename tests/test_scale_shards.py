"""The task-parallel shards writer against the in-process one: the same samples, statuses and contents."""

from __future__ import annotations

import json

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


def test_task_parallel_shards_write_what_the_in_process_writer_writes(tmp_path, cli_module):
    data = safety_recipe(tmp_path / "work", mine={"reuse_cap": 3})
    data["stages"]["shards"] = {"samples_per_shard": 20, "exclude_splits": ["test"], "method": "memory"}
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
    assert code == 0, err
    wd = WorkDir(tmp_path / "work")
    memory = {"status": wd.read_stage_columns("shards", ["key", "training"]).to_pylist()}
    for kind in ("quad", "plain"):
        memory[kind] = _samples(wd.stage_dir("shards") / kind)
    data["stages"]["shards"]["method"] = "tasks"
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
    assert code == 0, err
    assert wd.manifest("mine")["complete"]
    tasks = {"status": wd.read_stage_columns("shards", ["key", "training"]).to_pylist()}
    for kind in ("quad", "plain"):
        tasks[kind] = _samples(wd.stage_dir("shards") / kind)
    assert sorted(map(str, memory["status"])) == sorted(map(str, tasks["status"]))
    assert len(memory["quad"]) >= 20 and len(memory["plain"]) >= 20
    for kind in ("quad", "plain"):
        assert memory[kind].keys() == tasks[kind].keys()
        for key, sample in memory[kind].items():
            assert sample == tasks[kind][key], (kind, key)
    for kind in ("quad", "plain"):
        sizes = json.loads((wd.stage_dir("shards") / kind / "sizes.json").read_text())
        assert sum(sizes.values()) == len(tasks[kind]) and max(sizes.values()) <= 20
    selection = wd.stage_dir("shards") / "selection.parquet"
    import pyarrow.parquet as pq

    chosen = pq.read_table(selection).to_pylist()
    assert {r["key"] for r in chosen} == set(tasks["quad"]) | set(tasks["plain"])
    assert all(r["tar"].startswith(r["kind"] + "/") for r in chosen)
