"""score -> filter -> dedup -> neighbours -> mine on a small toy world: constraints, invalidation, accounting.

A random-init model is enough here: these tests check what must hold whatever the embeddings are. The quality
figures (mining precision, scoring AUROC) with the pretrained toy CLIP are in test_toy_mining.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe
from helpers import safety_recipe


def read(work, stage: str) -> pa.Table:
    return WorkDir(work).read_stage_columns(
        stage, pq.read_schema(next((work / stage).glob("part-*[0-9].parquet"))).names
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, cli_module):
    base = tmp_path_factory.mktemp("safety")
    work = base / "w"
    recipe = write_recipe(base / "r.yaml", safety_recipe(work))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    return base, work, recipe


def test_every_record_is_accounted_for(built):
    _, work, _ = built
    wd = WorkDir(work)
    source_keys = set(wd.read_stage_columns("source", ["key"])["key"].to_pylist())
    final = read(work, "mine")["key"].to_pylist()
    rejected = []
    for stage in ("source", "embed", "score", "filter", "dedup", "neighbours", "mine"):
        rejected += wd.rejects(stage)["key"].to_pylist()
    assert len(final) + len(rejected) == len(source_keys)
    assert set(final) | set(rejected) == source_keys
    for stage in ("dedup", "mine"):
        manifest = json.loads((work / stage / "_manifest.json").read_text())
        counts = manifest["counts"]
        assert counts["in"] == counts["out"] + counts["rejected"]
        assert sum(manifest["rejects_by_reason"].values()) == counts["rejected"]


def test_targets_obey_exclusions_and_reuse_cap(built):
    _, work, _ = built
    wd = WorkDir(work)
    src = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "group", "split", "role"]).to_pylist()}
    deduped = set(wd.rejects("dedup")["key"].to_pylist())
    mined = read(work, "mine").to_pylist()
    uses: dict[str, Counter] = {"text": Counter(), "image_text": Counter()}
    queries = 0
    for row in mined:
        if row["role"] != "unsafe":
            assert row["text_targets"] is None
            continue
        queries += 1
        for modality in uses:
            targets = row[f"{modality}_targets"] or []
            sims = row[f"{modality}_similarities"] or []
            assert len(targets) <= 3 and sims == sorted(sims, reverse=True)
            for t in targets:
                uses[modality][t] += 1
                assert src[t]["role"] == "safe"
                assert src[t]["group"] != src[row["key"]]["group"], "own group must be excluded by default"
                assert src[t]["split"] not in ("shift", "test"), "benchmark splits are never targets"
                assert t not in deduped
    assert queries > 100
    for modality, counter in uses.items():
        assert counter and max(counter.values()) <= 2, modality
    long = pq.read_table(work / "mine" / "targets.parquet").to_pylist()
    assert {(r["key"], r["modality"], r["rank"]) for r in long if r["rank"] == 1} == {
        (row["key"], m, 1) for row in mined for m in uses if row[f"{m}_targets"]
    }
    meta = json.loads((work / "mine" / "_manifest.json").read_text())["metadata"]
    low, high = (float(v) for v in meta["text_difficulty_tertiles"].split(","))
    for row in mined:
        if row["text_targets"]:
            top = row["text_similarities"][0]
            expected = "easy" if top >= high else "medium" if top >= low else "hard"
            assert row["text_difficulty"] == expected


def test_changing_a_threshold_reruns_filter_and_after_only(built, cli_module):
    base, work, _ = built
    before = {s: json.loads((work / s / "_manifest.json").read_text())["fingerprint"] for s in ("embed", "score")}
    times = {s: sorted(p.stat().st_mtime_ns for p in (work / s).glob("part-*")) for s in ("embed", "score")}
    alignment = sorted(WorkDir(work).read_stage_columns("score", ["alignment"])["alignment"].to_pylist())
    threshold = round(alignment[len(alignment) // 10], 4)  # rejects about a tenth
    recipe = write_recipe(base / "r2.yaml", safety_recipe(work, filter={"min_alignment": threshold}))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    for stage in ("embed", "score"):
        manifest = json.loads((work / stage / "_manifest.json").read_text())
        assert manifest["fingerprint"] == before[stage]
        assert sorted(p.stat().st_mtime_ns for p in (work / stage).glob("part-*")) == times[stage]
    filtered = json.loads((work / "filter" / "_manifest.json").read_text())
    assert filtered["rejects_by_reason"].get(f"alignment below {threshold:g}", 0) > 0
    assert "ran" in err.split("filter")[1].split("\n")[0]
    assert "up to date" in err.split("score")[1].split("\n")[0]


def test_allowing_the_own_group_lets_the_source_scene_be_mined(tmp_path, cli_module):
    work = tmp_path / "w"
    data = safety_recipe(work, neighbours={"allow_same_group": True, "modalities": ["image"]}, mine={"reuse_cap": None})
    code, _, err = cli_module(
        "build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local", "--no-progress"
    )
    assert code == 0, err
    src = {r["key"]: r for r in WorkDir(work).read_stage_columns("source", ["key", "group"]).to_pylist()}
    same = [
        row
        for row in read(work, "mine").to_pylist()
        if row["image_targets"] and any(src[t]["group"] == src[row["key"]]["group"] for t in row["image_targets"])
    ]
    assert same  # an unsafe image is a minimal edit of its source: nearest even under a random-init model


def test_probe_scores_sit_beside_the_zero_shot_ones(built):
    _, work, _ = built
    manifest = json.loads((work / "score" / "_manifest.json").read_text())
    probe = json.loads(manifest["metadata"]["probe"])
    assert probe["labelled"] == 360 and probe["folds"] == 2  # every toy record is labelled (180 scenes x 2)
    scores = read(work, "score")
    for name in ("probe_image_score_violence", "probe_text_score_illegal_activity", "image_score_violence"):
        values = scores[name].to_pylist()
        assert all(v is not None and 0.0 <= v <= 1.0 for v in values), name
