"""The toy safety world: determinism, minimal edits, ground truth, splits, and reading it back with `build`."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferclip_data.toyworld import (
    CATEGORIES,
    HELD_OUT_PLACES,
    TRAIN_PLACES,
    WorldConfig,
    world_records,
    write_world,
)
from saferclip_data.toyworld.glyphs import COLOURS, SHAPES
from saferclip_data.toyworld.world import HELD_OUT_OBJECTS, PHRASINGS, sample_scene

from conftest import write_recipe


def _bytes_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = WorldConfig(seed=5, scenes=60, shifted_scenes=10, shard_size=40)
    write_world(small, tmp_path / "a")
    write_world(small, tmp_path / "b")
    write_world(WorldConfig(seed=6, scenes=60, shifted_scenes=10, shard_size=40), tmp_path / "c")
    a, b, c = _bytes_of(tmp_path / "a"), _bytes_of(tmp_path / "b"), _bytes_of(tmp_path / "c")
    tars = [k for k in a if k.endswith(".tar")]
    assert len(tars) == 6  # train 96 records -> 3 shards of <= 40, val, test, shift one each
    assert a == b
    assert set(c) == set(a) and all(c[k] != a[k] for k in tars)


@pytest.fixture(scope="module")
def records():
    return list(world_records(WorldConfig(seed=0, scenes=1000, shifted_scenes=200)))


def test_unsafe_caption_is_the_safe_caption_plus_exactly_the_inserted_phrase(records):
    by_key = {r["key"]: r for r in records}
    unsafe = [r for r in records if r["role"] == "unsafe"]
    minimal = 0
    for record in unsafe:
        safe = by_key[record["source_safe"]]["caption"]
        inserted = " with " + record["unsafe_phrase"]
        position = record["caption"].find(inserted)
        if position >= 0 and record["caption"][:position] + record["caption"][position + len(inserted) :] == safe:
            minimal += 1
    assert minimal / len(unsafe) >= 0.99


def test_ground_truth_labels_and_noisy_pairs(records):
    by_key = {r["key"]: r for r in records}
    unsafe = [r for r in records if r["role"] == "unsafe"]
    assert len(unsafe) * 2 == len(records) == 2400
    assert all(by_key[r["source_safe"]]["role"] == "safe" for r in unsafe)
    assert all(by_key[r["source_safe"]]["group"] == r["group"] for r in unsafe)
    assert Counter(r["category"] for r in unsafe).keys() == set(CATEGORIES)
    assert len(CATEGORIES) == 7
    noisy = [r for r in unsafe if r["paired_safe"] != r["source_safe"]]
    assert 0.35 <= len(noisy) / len(unsafe) <= 0.45
    # a noisy pair is loosely related: another scene of the same place and split
    assert all(by_key[r["paired_safe"]]["place"] == r["place"] for r in noisy)
    assert all(by_key[r["paired_safe"]]["split"] == r["split"] for r in noisy)
    assert all(r["main_object"] in SHAPES and r["main_colour"] in COLOURS for r in records)
    assert len(SHAPES) >= 20 and len(COLOURS) >= 5 and len(TRAIN_PLACES) >= 8 and len(PHRASINGS) >= 5


def test_splits_and_the_shifted_split(records):
    safe = [r for r in records if r["role"] == "safe"]
    counts = Counter(r["split"] for r in safe)
    assert counts == {"train": 800, "val": 100, "test": 100, "shift": 200}
    # the default shift: an object at a place where no other split shows it; every place and object is familiar
    def pairs(record):
        return {(record["place"], obj.split("-", 1)[1]) for obj in record["objects"].split()}

    held = {(place, kind) for place, kinds in HELD_OUT_OBJECTS.items() for kind in kinds}
    shifted = [r for r in safe if r["split"] == "shift"]
    assert all((r["place"], r["main_object"]) in held for r in shifted)
    assert not any(pairs(r) & held for r in safe if r["split"] != "shift")
    assert {r["place"] for r in shifted} <= set(TRAIN_PLACES) and not {r["place"] for r in safe} & set(HELD_OUT_PLACES)
    assert {r["main_object"] for r in shifted} <= {r["main_object"] for r in safe if r["split"] == "train"}
    assert len({r["place"] for r in safe if r["split"] == "train"}) == 8


def test_pretraining_never_sees_a_held_out_pair_and_the_old_shift_stays_reachable():
    import random

    held = {(place, kind) for place, kinds in HELD_OUT_OBJECTS.items() for kind in kinds}
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(2000)]  # what pretraining and the toy model's figures draw
    assert not any((s.place, kind) in held for s in scenes for kind, _, _ in s.objects)
    assert {s.place for s in scenes} == set(TRAIN_PLACES)
    old = [r for r in world_records(WorldConfig(seed=2, scenes=20, shifted_scenes=30, shift="places"))
           if r["split"] == "shift"]  # fmt: skip
    assert old and {r["place"] for r in old} <= set(HELD_OUT_PLACES)


def test_build_reads_the_generated_world_like_user_data(tmp_path, cli):
    summary = write_world(WorldConfig(seed=1, scenes=40, shifted_scenes=8, shard_size=30), tmp_path / "world")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "toy",
            "source": {
                "kind": "webdataset",
                "path": str(tmp_path / "world" / "shards"),
                "extra_columns": ["split", "role", "source_safe", "paired_safe", "place"],
            },
            "model": {"arch": "toy-vit-tiny"},
            "stages": {"embed": {"batch_size": 32}},
        },
    )
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert code == 0, err
    parts = sorted((tmp_path / "w" / "source").glob("part-*[0-9].parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.num_rows == summary["records"] == 96
    manifest = pq.read_table(tmp_path / "world" / "manifest.parquet")
    expected = {r["key"]: r for r in manifest.to_pylist()}
    for row in table.select(["key", "caption", "group", "category", "source_safe", "split"]).to_pylist():
        truth = expected[row["key"]]
        assert (row["caption"], row["group"], row["category"], row["source_safe"], row["split"]) == (
            truth["caption"],
            truth["group"],
            truth["category"],
            truth["source_safe"],
            truth["split"],
        )
    assert json.loads((tmp_path / "world" / "world.json").read_text())["by_split"]["shift"] == {"safe": 8, "unsafe": 8}


def test_toy_source_kind_generates_into_the_cache_once(tmp_path, cli):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "toysrc",
            "source": {"kind": "toy", "toy": {"seed": 3, "scenes": 30, "shifted_scenes": 6, "shard_size": 25}},
            "model": {"arch": "toy-vit-tiny"},
            "stages": {"embed": {"batch_size": 64}},
        },
    )
    code, out, err = cli("validate", str(recipe))
    assert code == 0, err
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert code == 0, err
    parts = sorted((tmp_path / "w" / "source").glob("part-*[0-9].parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.num_rows == 72
    assert {"split", "role", "source_safe", "paired_safe", "place", "main_object"} <= set(table.column_names)
    unsafe = [r for r in table.to_pylist() if r["role"] == "unsafe"]
    assert len(unsafe) == 36 and all(r["category"] in CATEGORIES for r in unsafe)
    assert {r["split"] for r in table.to_pylist()} == {"train", "val", "test", "shift"}
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert "everything up to date" in err
