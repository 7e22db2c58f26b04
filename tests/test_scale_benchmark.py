"""The benchmark stage's leak check (a map over the shards) against an all-pairs search written in the test, and
``avoid_leaks`` passing over the candidates that check would flag."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.columns import unit_rows

from conftest import write_recipe
from helpers import safety_recipe

pytestmark = pytest.mark.slow


def _all_pairs_leaks(wd: WorkDir, selection, splits: set[str], threshold: float, k: int) -> dict[tuple, float]:
    """(member key, modality, training key) -> cosine for each member's k nearest training records at or above the
    threshold, every training record compared with every member at once."""
    kept = wd.read_stage_columns("mine", ["key"])["key"].to_pylist()
    embed = wd.read_stage_columns("embed", ["key", "image_embedding", "text_embedding"])
    row = {key: i for i, key in enumerate(embed["key"].to_pylist())}
    split = dict(zip(*wd.read_stage_columns("source", ["key", "split"]).to_pydict().values()))
    training = [key for key in kept if split[key] not in splits]
    members = selection["safe_key"].to_pylist() + selection["unsafe_key"].to_pylist()
    out = {}
    for modality in ("image", "text"):
        column = embed[f"{modality}_embedding"]
        vectors = unit_rows(column, column.type.list_size)[0]
        scores = vectors[[row[m] for m in members]] @ vectors[[row[t] for t in training]].T
        for member, line in zip(members, scores):
            for j in np.argsort(-line, kind="stable")[:k]:
                if line[j] >= threshold:
                    out[(member, modality, training[j])] = float(line[j])
    return out


def test_benchmark_leak_check_finds_what_an_all_pairs_search_finds(tmp_path, cli_module):
    data = safety_recipe(tmp_path / "work")
    data["stages"]["benchmark"] = {"splits": ["shift"], "size": 14, "duplicate_threshold": 0.999,
                                   "leak_threshold": 0.9, "alignment_percentile": 0,
                                   "caption_similarity_percentile": 0}  # fmt: skip
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
    assert code == 0, err
    wd = WorkDir(tmp_path / "work")
    folder = wd.stage_dir("benchmark")
    selection, leaks = pq.read_table(folder / "benchmark.parquet"), pq.read_table(folder / "leakage.parquet")
    assert selection.num_rows >= 5
    expected = _all_pairs_leaks(wd, selection, {"shift"}, 0.9, 4)
    near = {(r["benchmark_key"], r["modality"], r["training_key"]): r["cosine"]
            for r in leaks.to_pylist() if r["modality"] != "group"}  # fmt: skip
    assert len(expected) > 0  # the test has leaks to find
    # a cosine within float noise of the threshold may land either side on another machine
    assert {k for k, v in expected.items() if v > 0.9 + 1e-5} <= near.keys() <= expected.keys()
    assert all(abs(near[k] - expected[k]) < 1e-5 for k in near)
    held = wd.read_stage_columns("benchmark", ["key", "benchmark_id", "held_out"]).to_pylist()
    ids = {r["key"]: r["benchmark_id"] for r in held if r["benchmark_id"]}
    assert set(ids) == set(selection["safe_key"].to_pylist()) | set(selection["unsafe_key"].to_pylist())

    # avoid_leaks: candidates near a training record are passed over before selecting
    # (a threshold just under the closest leak found: that candidate must go, most others can stay)
    closest = max(near.values())
    data["stages"]["benchmark"].update(avoid_leaks=True, leak_threshold=closest - 1e-4)
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local")
    assert code == 0, err
    sheet = json.loads((folder / "datasheet.json").read_text())
    selection, leaks = pq.read_table(folder / "benchmark.parquet"), pq.read_table(folder / "leakage.parquet")
    assert selection.num_rows >= 3 and set(leaks["modality"].to_pylist()) <= {"group"}  # no near-copy selected
    skipped = sum(c["near_training_skipped"] for c in sheet["per_category"].values())
    worst = next(k[0] for k, v in near.items() if v == closest)
    members = set(selection["safe_key"].to_pylist()) | set(selection["unsafe_key"].to_pylist())
    assert skipped > 0 and worst not in members
