"""The benchmark stage (balanced selection, planted leaks found, exports that hash and read back), the shards
stage (quadruplet tars complete, a plain view open_clip's own loader reads, nothing held out ever shipped) and
the report (renders in headless Chromium, every plot present, unsafe thumbnails blurred)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.benchmark import Candidate, leaks_in_shard, merge_leaks, quotas, select

from conftest import write_recipe
from helpers import safety_recipe


def _candidate(i: int, category: str, sim: float) -> Candidate:
    return Candidate(f"g{i:04d}", category, 2 * i, 2 * i + 1, 0.3, 0.3, sim, 0.9)


def _orthogonal(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, n)))
    return q.T.astype(np.float32)  # n unit rows, pairwise orthogonal


def test_quotas_are_balanced_and_sum_to_size():
    q = quotas(1000, ["violence", "hate", "sexual", "self-harm", "shocking", "harassment", "illegal activity"])
    assert sum(q.values()) == 1000
    assert max(q.values()) - min(q.values()) <= 1


@pytest.mark.parametrize("seed", range(5))
def test_selection_meets_each_quota_within_one_wherever_supply_allows(seed):
    rng = random.Random(seed)
    categories = ["a", "b", "c", "d", "e"]
    supply = {c: rng.randint(0, 40) for c in categories}
    cands = [_candidate(i, c, rng.random()) for i, c in enumerate(c for c in categories for _ in range(supply[c]))]
    vectors = {"text": _orthogonal(2 * len(cands) or 1, dim=max(64, 2 * len(cands)), seed=seed)}
    quota = quotas(100, categories)
    chosen, skipped = select(cands, quota, vectors, duplicate_threshold=0.95)
    got = Counter(cands[i].category for i in chosen)
    for c in categories:
        assert got[c] == min(quota[c], supply[c])  # nothing is near-duplicate here: exact quota or all supply
        assert skipped[c] == 0
    picked_sims = {c: sorted(cands[i].caption_similarity for i in chosen if cands[i].category == c) for c in got}
    for c, sims in picked_sims.items():  # the most similar captions of each category were taken
        rest = [x.caption_similarity for i, x in enumerate(cands) if x.category == c and i not in chosen]
        assert not rest or min(sims) >= max(rest)


def test_near_duplicate_candidates_are_skipped_not_selected():
    cands = [_candidate(i, "a", 1.0 - i / 10) for i in range(4)]
    text = _orthogonal(8)
    text[2] = text[0]  # candidate 1's safe caption duplicates candidate 0's
    chosen, skipped = select(cands, {"a": 3}, {"text": text}, duplicate_threshold=0.95)
    assert chosen == [0, 2, 3] and skipped == {"a": 1}


def test_planted_near_duplicates_in_training_are_each_reported():
    # 4 benchmark quadruplets (rows 0-7) and 12 training records (rows 8-19); plant 3 near-copies + a group clash
    n = 20
    image, text = _orthogonal(n, seed=1), _orthogonal(n, seed=2)
    plants = {9: (0, "image"), 13: (5, "text"), 17: (6, "image")}  # training row -> (benchmark row, modality)
    for train_row, (bench_row, modality) in plants.items():
        target = image if modality == "image" else text
        noise = np.random.default_rng(train_row).standard_normal(target.shape[1]).astype(np.float32) * 0.01
        target[train_row] = (target[bench_row] + noise) / np.linalg.norm(target[bench_row] + noise)
    keys = [f"k{i:02d}" for i in range(n)]
    groups = [f"b{i // 2}" if i < 8 else f"t{i}" for i in range(n)]
    groups[19] = "b3"  # a training record sharing a benchmark group
    splits = ["shift"] * 8 + ["train"] * 12
    vector = pa.list_(pa.float32(), image.shape[1])
    table = pa.table({"key": keys, "group": groups, "split": splits,
                      "image_embedding": pa.array(list(image), vector), "text_embedding": pa.array(list(text), vector)})
    members = {"image": image[:8], "text": text[:8]}  # the 4 quadruplets' safe and unsafe rows, in member order
    settings = {"split_column": "split", "splits": ["shift"], "group_column": "group", "k": 4, "threshold": 0.95,
                "backend": "auto", "groups": {f"b{i}": f"bench-{i:05d}" for i in range(4)}}
    found = [leaks_in_shard(table, members, settings, 0)]
    leaks = merge_leaks(found, [(f"bench-{i // 2:05d}", keys[i]) for i in range(8)], 4)
    found = {(x["training_key"], x["modality"]) for x in leaks}
    assert found == {("k09", "image"), ("k13", "text"), ("k17", "image"), ("k19", "group")}
    by_key = {x["training_key"]: x for x in leaks}
    assert by_key["k09"]["benchmark_key"] == "k00" and by_key["k09"]["benchmark_id"] == "bench-00000"
    assert by_key["k13"]["benchmark_id"] == "bench-00002" and by_key["k13"]["cosine"] >= 0.95
    # avoid_leaks: the same plants make their candidates ineligible before selection (a shared group does not:
    # the whole split stays out of training, and the group check still lists it)
    near = leaks_in_shard(table, members, {**settings, "k": 1, "groups": {}}, 0)["near"]
    assert {f"b{member // 2}" for hits in near.values() for member, *_ in hits} == {"b0", "b2", "b3"}


def test_every_record_passes_through_and_selected_ones_carry_their_id(built):
    wd = WorkDir(built)
    mine_keys = wd.read_stage_columns("mine", ["key"])["key"].to_pylist()
    out = wd.read_stage_columns("benchmark", ["key", "benchmark_id", "role"])
    assert out["key"].to_pylist() == mine_keys
    table = pq.read_table(built / "benchmark" / "benchmark.parquet")
    ids = [x for x in out["benchmark_id"].to_pylist() if x]
    assert Counter(ids) == {i: 2 for i in table["benchmark_id"].to_pylist()}  # one safe + one unsafe each
    source = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "split", "group"]).to_pylist()}
    for row in table.to_pylist():
        assert source[row["safe_key"]]["split"] == source[row["unsafe_key"]]["split"] == "shift"
        assert source[row["safe_key"]]["group"] == source[row["unsafe_key"]]["group"] == row["group"]


def test_datasheet_hashes_match_the_exported_files(built):
    folder = built / "benchmark"
    sheet = json.loads((folder / "datasheet.json").read_text())
    assert len(sheet["files"]) >= 8
    for name, info in sheet["files"].items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"], name
    assert sheet["quadruplets"] == pq.read_table(folder / "benchmark.parquet").num_rows
    assert sum(c["selected"] for c in sheet["per_category"].values()) == sheet["quadruplets"]
    assert sheet["recipe_fingerprint"] == json.loads((folder / "_manifest.json").read_text())["fingerprint"]
    md = (folder / "datasheet.md").read_text()
    assert all(info["sha256"] in md for info in sheet["files"].values())


def test_retrieval_export_follows_clip_benchmark_layout_and_reads_back(built):
    folder = built / "benchmark" / "export"
    table = pq.read_table(built / "benchmark" / "benchmark.parquet").to_pylist()
    for role in ("safe", "unsafe"):
        assert (folder / role / "dataset_type.txt").read_text().strip() == "retrieval"
        nshards = int((folder / role / "test" / "nshards.txt").read_text())
        pattern = str(folder / role / "test" / f"{{0..{nshards - 1}}}.tar")
        # clip_benchmark's own pipeline: decode images to PIL, then (image, captions) tuples
        dataset = (
            wds.WebDataset(pattern, shardshuffle=False)
            .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
            .to_tuple(["webp", "png", "jpg", "jpeg"], "txt", "json")
        )
        samples = list(dataset)
        assert len(samples) == len(table)
        for (image, captions, meta), row in zip(samples, table):
            assert image.size[0] > 0 and meta["role"] == role and meta["benchmark_id"] == row["benchmark_id"]
            assert captions.splitlines() == [row[f"{role}_caption"]]


def test_clip_benchmark_retrieval_loader_reads_the_export(built):
    from clip_benchmark.datasets.builder import build_wds_dataset

    table = pq.read_table(built / "benchmark" / "benchmark.parquet").to_pylist()
    for role in ("safe", "unsafe"):
        root = str(built / "benchmark" / "export" / role)
        dataset = build_wds_dataset("nsfw-caps-style", transform=lambda image: image.size, data_dir=root)
        samples = list(dataset)
        assert [captions for _, captions in samples] == [[row[f"{role}_caption"]] for row in table]
        assert all(size[0] > 0 for size, _ in samples)


def test_same_selection_gives_byte_identical_exports(built, tmp_path, cli_module):
    recipe = safety_recipe(tmp_path / "w2")
    recipe["stages"]["benchmark"] = json.loads((built / "benchmark" / "datasheet.json").read_text())["settings"]
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", recipe)), "--executor", "local",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    first = json.loads((built / "benchmark" / "datasheet.json").read_text())["files"]
    second = json.loads((tmp_path / "w2" / "benchmark" / "datasheet.json").read_text())["files"]
    assert first == second


def _tar_samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_quadruplet_shards_have_every_member_and_no_held_out_record(built):
    wd = WorkDir(built)
    status = {r["key"]: r for r in wd.read_stage_columns("shards", ["key", "training", "tar"]).to_pylist()}
    bench = {r["key"]: r for r in wd.read_stage_columns("benchmark", ["key", "held_out", "role"]).to_pylist()}
    source = {r["key"]: r for r in wd.read_stage_columns("source", ["key", "split", "caption"]).to_pylist()}
    sizes = json.loads((built / "shards" / "quad" / "sizes.json").read_text())
    samples = _tar_samples(str(built / "shards" / "quad" / f"quad-{{000000..{len(sizes) - 1:06d}}}.tar"))
    assert len(samples) == sum(sizes.values()) == sum(s["training"] == "quad" for s in status.values()) > 0
    shipped = set()
    for sample in samples:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        assert "." not in key and bench[key]["role"] == "unsafe" and not bench[key]["held_out"]
        assert source[key]["split"] not in ("shift", "test")
        assert sample["unsafe.txt"].decode() == source[key]["caption"] and sample["unsafe.jpg"][:2] == b"\xff\xd8"
        text = np.load(io.BytesIO(sample["targets_text.npy"]))
        image = np.load(io.BytesIO(sample["targets_image.npy"]))
        assert text.shape[0] == image.shape[0] == len(meta["targets"]) >= 1
        assert [t["rank"] for t in meta["targets"]] == list(range(1, len(meta["targets"]) + 1))
        for t in meta["targets"]:
            assert not bench[t["key"]]["held_out"] and source[t["key"]]["split"] != "test"
        if meta["given_pair"]:
            assert sample["safe.txt"].decode() == source[meta["given_pair"]]["caption"] and "safe.jpg" in sample
        else:
            assert "safe.jpg" not in sample and "safe.txt" not in sample
        shipped.add(key)
    for key, row in status.items():  # every record says where it went
        assert (key in shipped) == (row["training"] == "quad")
        if bench[key]["held_out"]:
            assert row["training"] == "held out for the benchmark" and row["tar"] is None


def test_open_clip_training_loader_reads_the_plain_view(built):
    import argparse

    from open_clip_train.data import get_wds_dataset

    folder = built / "shards" / "plain"
    sizes = json.loads((folder / "sizes.json").read_text())
    pattern = str(folder / f"plain-{{000000..{len(sizes) - 1:06d}}}.tar")
    args = argparse.Namespace(
        train_data=pattern,
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=8,
        workers=0,
        world_size=1,
    )
    tokenizer = lambda texts: torch.zeros((len(texts) if isinstance(texts, list) else 1, 77), dtype=torch.long)  # noqa: E731
    preprocess = lambda image: torch.as_tensor(np.asarray(image.resize((32, 32)), np.float32)).permute(2, 0, 1)  # noqa: E731
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    total = sum(sizes.values())
    assert info.dataloader.num_samples == -(-total // 8) * 8  # sizes.json, rounded up to whole batches
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 32, 32) and texts.shape[0] == images.shape[0]
        seen += images.shape[0]
    assert total - 8 < seen <= info.dataloader.num_samples  # one epoch


def test_shards_are_deterministic_and_stats_match(built, tmp_path):
    stats = json.loads((built / "shards" / "quad" / "stats.json").read_text())
    for name, info in stats.items():
        data = (built / "shards" / "quad" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert sum(info["categories"].values()) == info["samples"] == sum(info["difficulty"].values())
    selection = pq.read_table(built / "shards" / "selection.parquet").to_pylist()
    quad = [s for s in selection if s["kind"] == "quad"]
    assert [s["order"] for s in quad] == list(range(len(quad)))
    assert [s["key"] for s in quad] == [x["__key__"] for x in _tar_samples(
        str(built / "shards" / "quad" / f"quad-{{000000..{len(stats) - 1:06d}}}.tar"))]  # fmt: skip


def _images_of(html_text: str, css_class: str) -> list[bytes]:
    pattern = rf"class='{css_class}'[^>]*src='data:image/png;base64,([^']+)'"
    return [base64.b64decode(b) for b in re.findall(pattern, html_text)]


def test_report_has_every_plot_and_the_numbers(built):
    folder = built / "report"
    stats = json.loads((folder / "report.json").read_text())
    page = (folder / "report.html").read_text()
    plots = _images_of(page, "plot")
    assert len(plots) == len(stats["plots"]) >= 9  # 2 score, alignment, and per mined modality: 4 or 5
    for png in plots:
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size[0] > 100 and np.asarray(image).std() > 0
    wd = WorkDir(built)
    reasons = Counter(wd.rejects("filter")["reason"].to_pylist())
    reported = {(r["stage"], r["reason"]): r["records"] for r in stats["rejects_by_reason"]}
    assert all(reported[("filter", reason)] == n for reason, n in reasons.items())
    targets = pq.read_table(built / "mine" / "targets.parquet").to_pandas()
    text = targets[targets.modality == "text"]
    assert stats["mining"]["text"]["distinct_targets"] == text.target.nunique()
    assert stats["mining"]["text"]["reuse_max"] == text.target.value_counts().max() <= 2  # the recipe's reuse cap
    assert stats["benchmark"]["quadruplets"] == pq.read_table(built / "benchmark" / "benchmark.parquet").num_rows


def test_unsafe_thumbnails_are_blurred_unless_asked(built, tmp_path, cli_module):
    from saferclip_data.stages.report import thumbnail

    source = {r["key"]: r["image"] for r in WorkDir(built).read_stage_columns("source", ["key", "image"]).to_pylist()}
    stats = json.loads((built / "report" / "report.json").read_text())
    shown = _images_of((built / "report" / "report.html").read_text(), "unsafe-thumb")
    assert len(shown) == len(stats["samples"]) >= 6 and stats["unsafe_thumbnails"] == "blurred"
    mined = WorkDir(built).read_stage_columns("mine", ["role", "category", "text_targets"]).to_pylist()
    categories = {r["category"] for r in mined if r["role"] == "unsafe" and r["text_targets"]}
    assert {s["category"] for s in stats["samples"]} == categories  # every category, even past --samples
    for png, sample in zip(shown, stats["samples"]):
        original = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbnail(source[sample["key"]], blur=False)))))
        in_report = np.asarray(Image.open(io.BytesIO(png)))
        assert in_report.shape == original.shape
        assert np.abs(in_report.astype(int) - original.astype(int)).mean() > 5  # visibly different
        assert in_report.astype(float).std() < original.astype(float).std()  # and smoother
    targets = _images_of((built / "report" / "report.html").read_text(), "safe-thumb")
    for png, sample in zip(targets, stats["samples"]):  # a target the model finds unsafe-looking is blurred too
        plain = base64.b64decode(thumbnail(source[sample["target"]], blur=False))
        assert (png != plain) == ((sample["target_unsafe_score"] or 0) >= 0.5), sample
    code, _, err = cli_module("report", str(built), "--out", str(tmp_path / "r"), "--samples", "6", "--show-unsafe")
    assert code == 0, err
    opened = _images_of((tmp_path / "r" / "report.html").read_text(), "unsafe-thumb")
    for png, sample in zip(opened, stats["samples"]):
        assert png == base64.b64decode(thumbnail(source[sample["key"]], blur=False))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium_without_console_errors(built, tmp_path):
    shot = tmp_path / "report.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", "--window-size=1200,4000", f"--screenshot={shot}", (built / "report" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (4000, 1200) and image.std() > 10  # a page with content, not a blank


def test_hf_export_loads_with_datasets_with_image_features(built, tmp_path, cli_module):
    """`export hf`: `datasets.load_dataset(OUT)` reads it with Image features; one row per quadruplet, images
    that decode, captions equal to the benchmark's; the card's front matter declares configs, features, license."""
    datasets = pytest.importorskip("datasets")
    import yaml

    out = tmp_path / "hf"
    code, stdout, err = cli_module("export", "hf", "-w", str(built), "--out", str(out), "--license", "cc-by-4.0")
    assert code == 0, err
    benchmark = pq.read_table(built / "benchmark" / "benchmark.parquet").to_pylist()
    ds = datasets.load_dataset(str(out), split="test")
    assert ds.num_rows == len(benchmark) > 0
    assert all(isinstance(ds.features[f"{role}_image"], datasets.Image) for role in ("safe", "unsafe"))
    for row, expected in zip(ds, benchmark):
        assert row["benchmark_id"] == expected["benchmark_id"]
        assert row["safe_caption"] == expected["safe_caption"] and row["unsafe_caption"] == expected["unsafe_caption"]
        for role in ("safe", "unsafe"):
            image = row[f"{role}_image"]
            if image is not None:
                image.load()
                assert image.size[0] > 0
    assert sum(r["unsafe_image"] is not None for r in ds) > 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-4.0" and front["configs"][0]["data_files"][0]["split"] == "test"
    assert {f["name"]: f["dtype"] for f in front["dataset_info"]["features"]}["unsafe_image"] == "image"
    sheet = json.loads((built / "benchmark" / "datasheet.json").read_text())
    assert all(f["sha256"] in card for f in sheet["files"].values())
    code, _, err = cli_module("export", "hf", "-w", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert code == 2 and "no work dir" in err
