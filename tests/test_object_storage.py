"""Sources on object storage: every source layout read from a real S3-protocol server on loopback (moto's
server mode, its own process) gives the same records as the same files on local disk; bad storage is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from s3_server import S3Server, use_server_env

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe
from embedding_layouts import planted_pool, write_clip_retrieval, write_datacomp
from helpers import scene, write_image_manifest, write_tar_shards

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "saferclip-sources"
MODEL = {"arch": "toy-vit-tiny", "pretrained": None}


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    use_server_env(monkeypatch, s3)
    return s3


def _image_folder(folder: Path, n: int) -> Path:
    """Images in two labelled sub-folders, most with a sidecar caption."""
    for i in range(n):
        data, caption = scene(i)
        sub = folder / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"im{i:03d}.jpg").write_bytes(data)
        if i % 5:
            (sub / f"im{i:03d}.txt").write_text(caption)
    return folder


def _layouts(tmp: Path) -> dict[str, tuple[Path, dict, str]]:
    """kind -> (local folder, source section with ``{path}`` for the source's location, relative path part)."""
    pool = planted_pool(400, 128)
    return {
        "manifest": (write_image_manifest(tmp / "manifest", 60, corrupt=(7,)).parent,
                     {"kind": "manifest", "shard_size": 25}, "manifest.csv"),
        "webdataset": (write_tar_shards(tmp / "tars", 50, per_shard=20)[0].parent,
                       {"kind": "webdataset"}, "shard-{000..002}.tar"),
        "image_folder": (_image_folder(tmp / "folder", 30), {"kind": "image_folder", "shard_size": 16,
                                                            "require_caption": False}, ""),
        "clip-retrieval": (write_clip_retrieval(tmp / "laion", pool, parts=2), {"kind": "embeddings"}, ""),
        "datacomp": (write_datacomp(tmp / "datacomp", pool, parts=2),
                     {"kind": "embeddings", "embeddings": {"layout": "datacomp", "image_key": "b32_img",
                                                           "text_key": "b32_txt"}}, ""),
    }  # fmt: skip


def _build(cli, tmp: Path, name: str, source: dict, embed: bool) -> tuple[int, str, Path]:
    work = tmp / f"work-{name}"
    recipe = {"name": "storage", "workdir": str(work), "source": source,
              "model": MODEL, "stages": {"embed": {}} if embed else {}}
    code, _, err = cli("build", str(write_recipe(tmp / f"{name}.yaml", recipe)), "--executor", "local",
                       "--no-progress")  # fmt: skip
    return code, err, work


@pytest.mark.parametrize("kind", ["manifest", "webdataset", "image_folder", "clip-retrieval", "datacomp"])
def test_a_source_in_a_bucket_gives_the_bytes_of_the_same_files_on_disk(tmp_path, s3_env, cli_module, kind):
    folder, source, relative = _layouts(tmp_path)[kind]
    url = s3_env.upload(folder, BUCKET, kind)
    embed = source["kind"] == "embeddings"  # the vectors are read by the embed stage: by byte range from the bucket
    built = {}
    for where, base in (("local", str(folder)), ("s3", url)):
        path = storage.join(base, relative) if relative else base
        code, err, work = _build(cli_module, tmp_path, f"{kind}-{where}", {**source, "path": path}, embed)
        assert code == 0, err
        built[where] = work
    compared = 0
    for stage in ("source", "embed") if embed else ("source",):
        local, remote = WorkDir(built["local"]), WorkDir(built["s3"])
        shards = local.completed_shards(stage)
        assert shards and remote.completed_shards(stage) == shards
        for shard in shards:
            for part in ("parquet", "rejects"):
                a, b = local.shard_path(stage, shard, part), remote.shard_path(stage, shard, part)
                assert pq.read_table(a).equals(pq.read_table(b)), (stage, shard, part)
                assert a.read_bytes() == b.read_bytes(), (stage, shard, part)
                compared += 1
    assert compared >= 2
    counts = [WorkDir(built[w]).manifest("source")["counts"]["out"] for w in ("local", "s3")]
    assert counts[0] == counts[1] >= 30


def test_storage_options_reach_the_bucket_and_are_written_nowhere(tmp_path, s3, monkeypatch, cli_module):
    """No AWS variable at all: the recipe's storage_options carry endpoint and keys (from ${ENV}), and no file of
    the work dir holds the secret."""
    for name in [n for n in __import__("os").environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MY_S3_SECRET", s3.env["AWS_SECRET_ACCESS_KEY"])
    url = s3.upload(write_image_manifest(tmp_path / "m", 20).parent, BUCKET, "options")
    recipe = {"name": "storage", "workdir": str(tmp_path / "work"),
              "storage_options": {"s3": {"endpoint_url": s3.endpoint, "key": s3.env["AWS_ACCESS_KEY_ID"],
                                         "secret": "${MY_S3_SECRET}", "client_kwargs": {"region_name": "us-east-1"}}},
              "source": {"kind": "manifest", "path": f"{url}/manifest.csv"}, "model": MODEL, "stages": {}}  # fmt: skip
    code, _, err = cli_module("build", str(write_recipe(tmp_path / "r.yaml", recipe)), "--executor", "local",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    assert WorkDir(tmp_path / "work").manifest("source")["counts"]["out"] == 20
    secret = s3.env["AWS_SECRET_ACCESS_KEY"].encode()
    leaked = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked


def _one_line_exit_2(cli, tmp_path: Path, source: dict) -> str:
    recipe = {"name": "storage", "workdir": str(tmp_path / "work"), "source": source, "model": MODEL, "stages": {}}
    code, _, err = cli("build", str(write_recipe(tmp_path / "bad.yaml", recipe)), "--executor", "local",
                       "--no-progress")  # fmt: skip
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_storage_is_one_line_naming_the_url(tmp_path, s3_env, cli_module, monkeypatch):
    url = s3_env.upload(write_image_manifest(tmp_path / "m", 10).parent, BUCKET, "bad")
    err = _one_line_exit_2(cli_module, tmp_path, {"kind": "manifest", "path": "s3://no-such-bucket/m.csv"})
    assert "s3://no-such-bucket/m.csv" in err and "bucket does not exist" in err
    err = _one_line_exit_2(cli_module, tmp_path, {"kind": "manifest", "path": f"{url}/missing.csv"})
    assert f"{url}/missing.csv" in err and "not found" in err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    err = _one_line_exit_2(cli_module, tmp_path, {"kind": "manifest", "path": f"{url}/manifest.csv"})
    assert url in err and "no credentials" in err
    use_server_env(monkeypatch, s3_env)
    from s3_server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    err = _one_line_exit_2(cli_module, tmp_path, {"kind": "manifest", "path": f"{url}/manifest.csv"})
    assert f"{url}/manifest.csv" in err and "cannot reach the endpoint" in err


def test_an_input_object_gone_mid_build_is_one_line_and_a_missing_image_a_reject(tmp_path, s3_env, cli_module):
    """A tar planned and then deleted stops the build naming it; an image a manifest names that is gone is that
    record's reject (the others are kept)."""
    from saferclip_data.pipeline.stage import ShardSpec
    from saferclip_data.stages.source import SourceConfig, SourceStage

    url = s3_env.upload(write_tar_shards(tmp_path / "tars", 20, per_shard=10)[0].parent, BUCKET, "gone")
    stage = SourceStage(SourceConfig(kind="webdataset", path=url), {})
    specs = stage.plan_shards(None)
    assert len(specs) == 2
    s3_env.client().delete_object(Bucket=BUCKET, Key="gone/" + storage.name(specs[1].payload["file"]))
    assert stage.read_shard(specs[0], None).num_rows == 10
    with pytest.raises(UserError, match=r"storage: s3://.*shard-001.tar: not found"):
        stage.read_shard(specs[1], None)

    folder = write_image_manifest(tmp_path / "m2", 12).parent
    url = s3_env.upload(folder, BUCKET, "gone-image")
    s3_env.client().delete_object(Bucket=BUCKET, Key="gone-image/images/img00004.jpg")
    code, err, work = _build(cli_module, tmp_path, "gone", {"kind": "manifest", "path": f"{url}/manifest.csv"}, False)
    assert code == 0, err
    rejects = WorkDir(work).rejects("source").to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [("rec_00004", "image not readable")]
    assert WorkDir(work).manifest("source")["counts"]["out"] == 11
    assert ShardSpec  # (imported for the plan's type)


def test_scratch_copies_are_removed(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("SAFERCLIP_SCRATCH", str(tmp_path / "scratch"))
    url = s3_env.upload(write_tar_shards(tmp_path / "tars", 10, per_shard=10)[0].parent, BUCKET, "scratch")
    with storage.local_copy(f"{url}/shard-000.tar") as local:
        assert local.is_file() and local.stat().st_size > 0
    assert not any(p.is_file() for p in (tmp_path / "scratch").rglob("*"))
    shutil.rmtree(tmp_path / "scratch", ignore_errors=True)
