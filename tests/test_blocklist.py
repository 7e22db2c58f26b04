"""Image-byte blocklists at ingestion: matching records rejected as "blocklisted", bad lists refused up front."""

from __future__ import annotations

import hashlib

import pytest

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.blocklist import load_blocklist
from saferclip_data.stages.source import SourceConfig, SourceStage

from conftest import recipe_dict, write_recipe
from helpers import write_image_manifest


def _digest(path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def test_blocklisted_images_are_rejected_with_the_matching_digest(tmp_path):
    manifest = write_image_manifest(tmp_path, 8)
    images = tmp_path / "images"
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text(
        "# known-bad images\n"
        f"{_digest(images / 'img00001.jpg', 'sha256')}\n"
        f"md5:{_digest(images / 'img00005.jpg', 'md5').upper()}  # upper case is fine\n"
        "\n"
        f"sha256:{'0' * 64}\n"  # matches nothing
    )
    stage = SourceStage(SourceConfig(kind="manifest", path=str(manifest), blocklist=str(blocklist)), {})
    spec = stage.plan_shards(WorkDir(tmp_path / "w"))[0]
    result = stage.process_batch(stage.read_shard(spec, None))
    rejects = {r.key: r for r in result.rejects}
    assert set(rejects) == {"rec_00001", "rec_00005"}
    assert {r.reason for r in rejects.values()} == {"blocklisted"}
    assert rejects["rec_00001"].error.startswith(f"sha256:{_digest(images / 'img00001.jpg', 'sha256')}")
    assert rejects["rec_00005"].error.startswith("md5:")
    assert result.table.num_rows == 6 and "rec_00001" not in result.table["key"].to_pylist()


def test_identical_bytes_under_another_name_are_caught_too(tmp_path):
    manifest = write_image_manifest(tmp_path, 4)
    images = tmp_path / "images"
    (images / "img00003.jpg").write_bytes((images / "img00000.jpg").read_bytes())  # a re-upload
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text(_digest(images / "img00000.jpg", "sha256") + "\n")
    stage = SourceStage(SourceConfig(kind="manifest", path=str(manifest), blocklist=str(blocklist)), {})
    result = stage.process_batch(stage.read_shard(stage.plan_shards(WorkDir(tmp_path / "w"))[0], None))
    assert sorted(r.key for r in result.rejects) == ["rec_00000", "rec_00003"]
    assert result.table["key"].to_pylist() == ["rec_00001", "rec_00002"]


@pytest.mark.parametrize(
    "line, expected",
    [("abc123", "line 2"), ("sha1:" + "a" * 40, "line 2"), ("md5:" + "g" * 32, "line 2")],
)
def test_malformed_blocklist_line_is_named(tmp_path, line, expected):
    path = tmp_path / "b.txt"
    path.write_text("a" * 64 + "\n" + line + "\n")
    with pytest.raises(UserError, match=expected) as info:
        load_blocklist(path)
    assert str(path) in str(info.value)


def test_recipe_with_a_bad_blocklist_fails_validation_in_one_line(tmp_path, cli):
    manifest = write_image_manifest(tmp_path / "src", 4)
    (tmp_path / "bad.txt").write_text("not-a-digest\n")
    data = recipe_dict(manifest)
    data["source"]["blocklist"] = "bad.txt"  # relative: against the recipe's folder
    recipe = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = cli("validate", str(recipe))
    assert code == 2
    assert "source.blocklist" in err and "line 1" in err and len(err.strip().splitlines()) == 1
