"""Precomputed-embedding sources (LAION / clip-retrieval and DataComp layouts): built without running a model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.columns import unit_rows

from conftest import write_recipe
from embedding_layouts import planted_pool, write_clip_retrieval, write_datacomp
from loopback import Server, image_bytes

DIM = 128  # the toy architectures' width


def _recipe(folder, work, **source) -> dict:
    return {
        "name": "precomputed",
        "workdir": str(work),
        "source": {"kind": "embeddings", "path": str(folder), "shard_size": 300, **source},
        "model": {"arch": "toy-vit-tiny", "pretrained": None},
        "stages": {
            "embed": {},
            "score": {"role_column": "label"},
            "filter": {"role_from": "labels"},
            "dedup": {"by": ["image", "text"]},
            "neighbours": {"modalities": ["text", "image"], "candidates": 4},
            "mine": {"k": 2},
        },
    }


@pytest.mark.parametrize("layout", ["clip-retrieval", "datacomp"])
def test_an_embeddings_folder_builds_and_mines_the_planted_pairs(tmp_path, cli_module, layout):
    pool = planted_pool(1_600, DIM)
    if layout == "clip-retrieval":
        folder, options = write_clip_retrieval(tmp_path / "laion", pool, parts=3), {}
    else:
        folder = write_datacomp(tmp_path / "datacomp", pool, parts=4)
        options = {"embeddings": {"layout": "datacomp", "image_key": "b32_img", "text_key": "b32_txt"}}
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(folder, tmp_path / "work", **options))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    wd = WorkDir(tmp_path / "work")
    assert wd.manifest("source")["counts"]["out"] == 1_600 and wd.manifest("embed")["counts"]["out"] == 1_600
    embed = wd.read_stage_columns("embed", ["key", "text_embedding"])
    vectors, valid = unit_rows(embed["text_embedding"], DIM)
    row = {k: i for i, k in enumerate(pool["keys"])}
    expected = pool["text"][[row[k] for k in embed["key"].to_pylist()]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert valid.all() and np.abs(vectors - expected).max() < 2e-3  # the files' vectors, normalised, in fp16
    score_identity = wd.manifest("score")["metadata"]["model_identity"]
    assert wd.manifest("embed")["metadata"]["model_identity"] == score_identity  # the recipe's model, recorded
    source = wd.read_stage_columns("source", ["key", "url", "label"]).to_pylist()
    assert all(r["url"].endswith(f"/{r['key']}.jpg") for r in source)
    assert {r["label"] for r in source} == {"safe", "unsafe"}
    mined = wd.read_stage_columns("mine", ["key", "role", "text_targets", "image_targets"]).to_pylist()
    unsafe = [r for r in mined if r["role"] == "unsafe"]
    assert len(unsafe) >= 700
    for modality in ("text", "image"):
        hits = sum(r[f"{modality}_targets"][0] == r["key"].replace("unsafe", "safe") for r in unsafe)
        assert hits / len(unsafe) >= 0.95, (modality, hits)


def test_vectors_of_another_width_are_a_one_line_error(tmp_path, cli_module):
    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(200, 64), parts=1)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(folder, tmp_path / "work"))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 2 and "metadata_0.parquet" in err and "64" in err and "128" in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_part_without_its_vectors_is_a_recipe_error(tmp_path, cli_module):
    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(200, DIM), parts=2)
    (folder / "text_emb" / "text_emb_1.npy").unlink()
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(folder, tmp_path / "work"))
    code, _, err = cli_module("validate", str(recipe))
    assert code == 2 and "text_emb/text_emb_1.npy" in err and "source.path" in err


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["clip-retrieval", "datacomp"])
def test_only_the_selected_records_images_are_fetched(tmp_path, cli_module, layout):
    """Select on embeddings and metadata, then download: the loopback server sees exactly the images of the
    records that went into a tar (and the one that fails, recorded with its reason); filtered records never."""
    jpeg = image_bytes("JPEG", (200, 40, 40), 32)
    with Server({}, fallback=lambda request: (404, "text/plain", b"gone") if "/img/safe000005" in request.path
                else (200, "image/jpeg", jpeg)) as server:  # fmt: skip
        url = server.url + "/img/{key}.jpg"
        pool = planted_pool(1_000, DIM, seed=1)
        if layout == "clip-retrieval":
            folder, options = write_clip_retrieval(tmp_path / "laion", pool, parts=3, url=url), {}
        else:
            folder = write_datacomp(tmp_path / "datacomp", pool, parts=3, url=url)
            options = {"embeddings": {"layout": "datacomp", "image_key": "b32_img", "text_key": "b32_txt"}}
        data = _recipe(folder, tmp_path / "work", **options, download={"image_size": 32, "timeout": 5, "threads": 8})
        data["stages"]["filter"]["caption_words"] = {"min": 2}
        data["stages"]["shards"] = {"samples_per_shard": 200}
        code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local",
                                  "--no-progress")  # fmt: skip
        assert code == 0, err
        assert "Traceback" not in err and "resource_tracker" not in err and "it/s]" not in err, err  # a clean log
        requested = [hit.rsplit("/", 1)[1].removesuffix(".jpg") for hit in server.hits]
    wd = WorkDir(tmp_path / "work")
    training = {r["key"]: r for r in wd.read_stage_columns("shards", ["key", "training", "tar"]).to_pylist()}
    in_tars = {k for k, r in training.items() if r["tar"]}
    filtered = {r["key"] for r in wd.rejects("filter").to_pylist()}
    assert len(filtered) >= 100 and len(in_tars) >= 600
    assert set(requested) == in_tars | {"safe000005"} and len(requested) == len(set(requested))  # each once
    assert not set(requested) & filtered
    assert training["safe000005"]["training"].startswith("safe image not fetched (download failed_to_download")
    sizes = json.loads((wd.stage_dir("shards") / "quad" / "sizes.json").read_text())
    quads = [k for k, r in training.items() if r["training"] == "quad"]
    assert sum(sizes.values()) == len(quads) >= 300
    tar = next((wd.stage_dir("shards") / "quad").glob("*.tar"))
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    assert {"unsafe.jpg", "unsafe.txt", "targets_text.npy", "json"} <= set(sample)
    meta = json.loads(sample["json"])
    assert meta["targets"] and meta["targets"][0]["key"] == meta["key"].replace("unsafe", "safe")
