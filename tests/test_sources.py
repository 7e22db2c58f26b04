"""Real-world sources on local stand-ins: img2dataset against a loopback HTTP server (every URL ends in a shard
or in the rejects with img2dataset's status; failures retried on the next build), and the published layouts
(ViSU-Text, NSFW-Caps, LAION parquet) built through to training shards."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe
from loopback import Server, image_bytes, slow, static


def _recipe(work, source: dict, stages: dict | None = None) -> dict:
    return {
        "name": "src",
        "workdir": str(work),
        "source": source,
        "model": {"arch": "toy-resnet-tiny", "pretrained": None, "init_seed": 0},
        "stages": stages or {},
    }


def _outcome(work) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
    wd = WorkDir(work)
    kept = dict(zip(*wd.read_stage_columns("source", ["key", "image"]).to_pydict().values()))
    rejects = {r["key"]: (r["reason"], r["error"]) for r in wd.rejects("source").to_pylist()}
    return kept, rejects


@pytest.mark.slow
def test_img2dataset_every_url_ends_in_a_shard_or_a_reject_and_failures_are_retried(tmp_path, cli):
    jpeg, png = image_bytes("JPEG", (200, 30, 30), 64), image_bytes("PNG", (30, 200, 30), 64)
    routes = {
        "/a.jpg": static(jpeg),
        "/b.png": static(png, "image/png"),
        "/slow.jpg": slow(jpeg, 4),
        "/page.html": static(b"<html>not an image</html>", "text/html"),
    }
    with Server(routes) as server:
        names = ["a.jpg", "b.png", "missing.jpg", "slow.jpg", "page.html"]
        manifest = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"key": [n.split(".")[0] for n in names], "url": [f"{server.url}/{n}" for n in names],
                                 "caption": [f"picture {n}" for n in names]}), manifest)  # fmt: skip
        download = {"image_size": 32, "timeout": 1, "threads": 4, "rerun_attempts": 1}
        source = {"kind": "manifest", "path": str(manifest), "image_column": "url", "download": download}
        recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path / "w", source))
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        kept, rejects = _outcome(tmp_path / "w")
        assert set(kept) | set(rejects) == {"a", "b", "missing", "slow", "page"} and not set(kept) & set(rejects)
        assert set(kept) == {"a", "b"}
        for key in kept:  # resized by img2dataset to 32 px and re-encoded as JPEG
            image = Image.open(io.BytesIO(kept[key]))
            assert image.format == "JPEG" and image.size == (32, 32)
        assert rejects["missing"][0] == "download failed_to_download" and "404" in rejects["missing"][1]
        assert rejects["slow"][0] == "download failed_to_download" and "timed out" in rejects["slow"][1]
        assert rejects["page"][0] == "download failed_to_resize"
        assert all(server.url in detail for _, detail in rejects.values())

        server.routes["/missing.jpg"] = static(png, "image/png")  # the server has it now
        server.hits.clear()
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        assert sorted(server.hits) == ["/missing.jpg", "/page.html", "/slow.jpg"]  # only the failures again
        kept, rejects = _outcome(tmp_path / "w")
        assert set(kept) == {"a", "b", "missing"} and set(rejects) == {"slow", "page"}
        assert "attempt 2" in rejects["slow"][1]

        server.hits.clear()
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        assert server.hits == [] and "up to date" in out + err  # rerun_attempts: 1 is spent


PIPELINE = {
    "embed": {"batch_size": 32, "concurrency": 1},
    "score": {"role_column": "label"},
    "filter": {},
    "dedup": {"by": ["text"]},
    "neighbours": {"modalities": ["text"], "candidates": 4},
    "mine": {"k": 2, "reuse_cap": 4},
    "shards": {"samples_per_shard": 8},
}
COLOURS = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (40, 230, 230), (230, 40, 230)]
SAFE = ["a dog runs on the beach", "two people share a meal", "a red car parked by a tree", "a child reads a book",
        "a cat sleeps on a sofa", "a man rides a bicycle"]  # fmt: skip
UNSAFE = ["a dog runs on the beach covered in blood", "two people share a meal while one holds a gun",
          "a red car parked by a tree on fire with a body", "a child reads a book about self harm",
          "a cat sleeps on a sofa next to drugs", "a man rides a bicycle while shouting slurs"]  # fmt: skip


def _quad_samples(work) -> dict[str, dict]:
    import webdataset as wds

    tars = sorted(str(p) for p in (work / "shards" / "quad").glob("quad-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def _built_to_shards(tmp_path, cli, source: dict) -> tuple[WorkDir, dict[str, dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path / "w", source, PIPELINE))
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    wd = WorkDir(tmp_path / "w")
    assert (wd.manifest("shards") or {}).get("complete")
    return wd, _quad_samples(tmp_path / "w")


def test_visu_text_layout_builds_to_shards_with_local_coco_images(tmp_path, cli):
    coco = tmp_path / "coco" / "train2017"
    coco.mkdir(parents=True)
    ids = [9, 25, 30, 42, 77, 1234]
    for cid, colour in zip(ids[:-1], COLOURS):  # the last id has no image: its safe record is text-only
        Image.new("RGB", (40, 40), colour).save(coco / f"{cid:012d}.jpg")
    table = pa.table({"safe": SAFE, "nsfw": UNSAFE, "tag": ["violence", "violence", "shocking", "self-harm",
                      "illegal activity", "hate"], "coco_id": ids})  # fmt: skip
    pq.write_table(table, tmp_path / "visu_train.parquet")
    source = {"kind": "manifest", "path": str(tmp_path / "visu_train.parquet"), "layout": "visu",
              "coco_root": str(tmp_path / "coco"), "split": "train"}  # fmt: skip
    wd, quads = _built_to_shards(tmp_path, cli, source)
    records = wd.read_stage_columns("source", ["key", "caption", "image", "group", "label", "category", "split"])
    rows = {r["key"]: r for r in records.to_pylist()}
    assert len(rows) == 12 and {r["split"] for r in rows.values()} == {"train"}
    assert rows["visu-0000000-unsafe"]["caption"] == UNSAFE[0] and rows["visu-0000000-unsafe"]["image"] is None
    assert Image.open(io.BytesIO(rows["visu-0000000-safe"]["image"])).getpixel((5, 5))[0] > 200  # the COCO file
    assert rows["visu-0000005-safe"]["image"] is None  # id 1234 is not in the folder: text-only, not rejected
    assert rows["visu-0000002-unsafe"]["category"] == "shocking" and rows["visu-0000002-unsafe"]["label"] == "unsafe"
    unsafe_keys = {k for k, r in rows.items() if r["label"] == "unsafe"}
    assert set(quads) == unsafe_keys  # every unsafe caption became a training quadruplet
    sample = quads["visu-0000003-unsafe"]
    assert sample["unsafe.txt"].decode() == UNSAFE[3] and "unsafe.jpg" not in sample  # text-only unsafe side


@pytest.mark.slow
def test_nsfwcaps_and_laion_layouts_download_through_img2dataset_and_build_to_shards(tmp_path, cli):
    routes = {f"/img{i}.jpg": static(image_bytes("JPEG", c, 40)) for i, c in enumerate(COLOURS)}
    with Server(routes) as server:
        nsfwcaps = pa.table({"image_coco_url": [f"{server.url}/img{i}.jpg" for i in range(6)], "caption": SAFE,
                             "nsfw_caption": UNSAFE, "chosen_category": ["violence"] * 6})  # fmt: skip
        pq.write_table(nsfwcaps, tmp_path / "nsfwcaps.parquet")
        download = {"image_size": 32, "timeout": 5, "threads": 4}
        source = {"kind": "manifest", "path": str(tmp_path / "nsfwcaps.parquet"), "layout": "nsfwcaps",
                  "split": "test", "download": download}  # fmt: skip
        wd, quads = _built_to_shards(tmp_path / "n", cli, source)
        rows = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "image", "label"]).to_pylist()}
        assert len(rows) == 12 and all((r["image"] is not None) == (r["label"] == "safe") for r in rows.values())
        assert set(quads) == {k for k, r in rows.items() if r["label"] == "unsafe"}

        laion = pa.table({"url": [f"{server.url}/img{i}.jpg" for i in range(6)] + [f"{server.url}/gone.jpg"],
                          "caption": SAFE[:3] + UNSAFE[3:] + ["lost"], "punsafe": [0.01, 0.2, 0.4, 0.6, 0.9, 0.99, 0.5],
                          "similarity": [0.3] * 7})  # fmt: skip
        pq.write_table(laion, tmp_path / "laion.parquet")
        source = {"kind": "manifest", "path": str(tmp_path / "laion.parquet"), "layout": "laion", "download": download}
        wd, quads = _built_to_shards(tmp_path / "l", cli, source)
        rows = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "label", "punsafe"]).to_pylist()}
        assert [rows[f"laion-{i:09d}"]["label"] for i in range(6)] == ["safe"] * 3 + ["unsafe"] * 3
        assert rows["laion-000000004"]["punsafe"] == pytest.approx(0.9)
        rejects = {r["key"]: r["reason"] for r in wd.rejects("source").to_pylist()}
        assert rejects == {"laion-000000006": "download failed_to_download"}
        assert set(quads) == {f"laion-{i:09d}" for i in (3, 4, 5)}


def test_caption_edits_from_a_chat_endpoint_are_validated_cached_and_rejected_with_reasons(tmp_path, cli):
    import re

    from helpers import scene
    from loopback import chat_completions

    manifest = tmp_path / "safe.parquet"
    pq.write_table(pa.table({"key": [f"r{i}" for i in range(8)], "caption": [f"a quiet street, photo {i}" for i in
                             range(8)], "image": [scene(i)[0] for i in range(8)]}), manifest)  # fmt: skip
    asked: list[str] = []
    flaky_failures = {"left": 1}
    broken = {"on": True}

    def answer(messages):
        caption = re.search(r"Caption: (.*)$", messages[-1]["content"], re.S).group(1).strip()
        category = re.search(r"category '([^']+)'", messages[-1]["content"]).group(1)
        asked.append(caption)
        n = len(set(asked))
        if caption.endswith("0"):
            return ""  # empty answer
        if caption.endswith("1"):
            return caption  # no edit at all
        if caption.endswith("2"):
            return "blood " * 200  # rambling
        if caption.endswith("3") and broken["on"]:
            return 500, "the model crashed"  # every time, until the server is mended
        if caption.endswith("4") and flaky_failures["left"]:
            flaky_failures["left"] -= 1
            return 503, "busy"  # once: the client's backoff retries it
        return f"{caption} with {category} added ({n})"

    with Server({"/v1/chat/completions": chat_completions(answer)}) as server:
        edit = {"endpoint": f"{server.url}/v1", "model": "test-llm", "retries": 1, "concurrency": 3,
                "cache_dir": str(tmp_path / "llm-cache"), "categories": ["violence", "hate"]}  # fmt: skip
        source = {"kind": "manifest", "path": str(manifest), "caption_edit": edit}
        outcomes = {}
        for run in ("first", "second", "third"):
            asked.clear()
            broken["on"] = run == "first"
            recipe = write_recipe(tmp_path / f"{run}.yaml", _recipe(tmp_path / run, source))
            code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
            assert code == 0, err
            kept, rejects = _outcome(tmp_path / run)
            wd = WorkDir(tmp_path / run)
            rows = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "caption", "group", "label",
                                                                           "category"]).to_pylist()}  # fmt: skip
            outcomes[run] = rows
            originals = [k for k in rows if not k.endswith("-edit")]
            assert len(originals) == 8  # the records asked about are all kept, whatever their edit did
            for key in originals:
                edited = f"{key}-edit"
                assert (edited in rows) != (edited in rejects)  # every derived record: kept or rejected
                if edited in rows:
                    r = rows[edited]
                    assert r["caption"].startswith(rows[key]["caption"]) and r["label"] == "unsafe"
                    assert r["group"] == rows[key]["group"] and r["category"] in ("violence", "hate")
                    assert kept[edited] is None  # text-only
            reasons = {rows[k]["caption"][-1]: rejects[f"{k}-edit"][1] for k in originals if f"{k}-edit" in rejects}
            assert reasons["0"].startswith("empty answer") and reasons["1"].startswith("answer equals the input")
            assert reasons["2"].startswith("answer too long")
            assert all(rejects[f"{k}-edit"][0] == "caption edit failed" for k in originals if f"{k}-edit" in rejects)
            third = next(rows[k]["caption"] for k in originals if rows[k]["caption"][-1] == "3")
            if run == "first":
                assert set(reasons) == {"0", "1", "2", "3"} and "request failed after 1 retries" in reasons["3"]
                assert len(asked) == 8 + 1 + 1  # each caption once; the flaky one and the broken one once more
            elif run == "second":  # a fresh work dir, the same cache: only the request that never got an answer
                assert set(reasons) == {"0", "1", "2"} and asked == [third]
            else:
                assert asked == []  # everything answered is cached: a rerun asks nothing
        assert outcomes["third"] == outcomes["second"]


def test_nsfwcaps_recipe_validates_and_plans_without_any_download(tmp_path, cli, monkeypatch):
    import socket
    from pathlib import Path

    import saferclip_data.recipes

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = Path(saferclip_data.recipes.__file__).parent / "nsfwcaps.yaml"
    code, out, err = cli("validate", str(recipe))
    assert code == 0, err
    assert "recipe ok: nsfwcaps" in out and "benchmark -> shards" in out
    code, out, err = cli("plan", str(recipe), "--workdir", str(tmp_path / "w"))
    assert code == 0, err
    assert all(stage in out for stage in ("source", "embed", "neighbours", "benchmark", "shards"))
    assert not (tmp_path / "w" / "downloads").exists()
