"""The task-parallel benchmark against the in-process one: the same selection, leaks and outputs."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe
from helpers import safety_recipe

pytestmark = pytest.mark.slow


def test_task_parallel_benchmark_selects_and_checks_leaks_as_the_in_process_one(tmp_path, cli_module):
    data = safety_recipe(tmp_path / "work")
    data["stages"]["benchmark"] = {"splits": ["shift"], "size": 14, "duplicate_threshold": 0.999,
                                   "leak_threshold": 0.9, "alignment_percentile": 0,
                                   "caption_similarity_percentile": 0, "method": "memory"}  # fmt: skip
    results = {}
    for method in ("memory", "tasks"):
        data["stages"]["benchmark"]["method"] = method
        code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
        assert code == 0, err
        wd = WorkDir(tmp_path / "work")
        folder = wd.stage_dir("benchmark")
        results[method] = {
            "shards": wd.read_stage_columns("benchmark", ["key", "role", "category", "benchmark_id", "held_out"]),
            "selection": pq.read_table(folder / "benchmark.parquet"),
            "leaks": pq.read_table(folder / "leakage.parquet") if (folder / "leakage.parquet").is_file() else None,
        }
    memory, tasks = results["memory"], results["tasks"]
    assert memory["selection"].num_rows >= 5 and memory["selection"].equals(tasks["selection"])
    assert memory["shards"].equals(tasks["shards"])
    assert memory["leaks"] is not None and memory["leaks"].num_rows > 0  # the test has leaks to find
    assert memory["leaks"].equals(tasks["leaks"])

    # avoid_leaks: candidates near a training record are passed over before selecting, on both paths alike
    # (a threshold just under the closest leak found: that candidate must go, most others can stay)
    closest = max(v for v in memory["leaks"]["cosine"].to_pylist() if v is not None)
    data["stages"]["benchmark"].update(avoid_leaks=True, leak_threshold=closest - 1e-4)
    avoided = {}
    for method in ("memory", "tasks"):
        data["stages"]["benchmark"]["method"] = method
        code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
        assert code == 0, err
        folder = WorkDir(tmp_path / "work").stage_dir("benchmark")
        sheet = json.loads((folder / "datasheet.json").read_text())
        avoided[method] = (pq.read_table(folder / "benchmark.parquet"), pq.read_table(folder / "leakage.parquet"),
                           sheet)  # fmt: skip
    (selection, leaks, sheet), (selection_tasks, leaks_tasks, _) = avoided["memory"], avoided["tasks"]
    assert selection.equals(selection_tasks) and leaks.equals(leaks_tasks)
    assert selection.num_rows >= 3 and set(leaks["modality"].to_pylist()) <= {"group"}  # no near-copy selected
    skipped = sum(c["near_training_skipped"] for c in sheet["per_category"].values())
    worst = memory["leaks"].to_pylist()[memory["leaks"]["cosine"].to_pylist().index(closest)]["benchmark_key"]
    members = set(selection["safe_key"].to_pylist()) | set(selection["unsafe_key"].to_pylist())
    assert skipped > 0 and worst not in members
