"""A work dir in a bucket (``-w s3://...``) on a real S3-protocol server on loopback (moto's server mode, its own
process), reached through the standard AWS variables only: the same bytes as a work dir on disk, a rerun that
writes nothing, and the reading commands on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3_server import S3Server, use_server_env

from saferclip_data.pipeline import mirror, storage

from conftest import recipe_dict, run_cli, write_recipe
from helpers import safety_recipe

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "saferclip-runs"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    use_server_env(monkeypatch, s3)
    monkeypatch.setenv("SAFERCLIP_SCRATCH", str(tmp_path / "scratch"))
    return s3


def _recipe(tmp_path: Path) -> Path:
    """The safety stages from source to report on a small toy world (its work dir is given with -w)."""
    data = safety_recipe(tmp_path / "unused")
    del data["workdir"]
    data["stages"]["benchmark"] = {"splits": ["shift"], "size": 10, "alignment_percentile": 0,
                                   "caption_similarity_percentile": 0, "duplicate_threshold": 1.0}  # fmt: skip
    data["stages"]["shards"] = {"samples_per_shard": 40, "exclude_splits": ["test"]}
    data["stages"]["report"] = {"samples": 4}
    return write_recipe(tmp_path / "r.yaml", data)


def _data_files(root: str) -> list[str]:
    return [f for f in storage.walk_files(root) if f.endswith((".parquet", ".tar", ".npy"))]


def test_a_build_in_a_bucket_writes_the_local_bytes_and_a_rerun_puts_nothing(s3_env, tmp_path, cli):
    recipe, url = _recipe(tmp_path), f"s3://{BUCKET}/runs/first"
    code, _, err = cli("build", str(recipe), "-w", url, "--executor", "local", "--no-progress")
    assert code == 0, err
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "local"), "--executor", "local", "--no-progress")
    assert code == 0, err

    remote, local = _data_files(url), _data_files(str(tmp_path / "local"))
    assert remote == local and len(remote) >= 60, (len(remote), sorted(set(local) ^ set(remote))[:5])
    assert any(f.endswith(".tar") for f in remote) and any(f.endswith(".npy") for f in remote)
    for name in remote:
        assert storage.read_bytes(f"{url}/{name}") == (tmp_path / "local" / name).read_bytes(), name
    markers = [f for f in storage.walk_files(url) if f.endswith(".done.json")]
    assert markers and not [f for f in storage.walk_files(url) if ".tmp" in f]  # no temp object in the bucket

    puts_before = len(s3_env.requests("PUT"))
    code, _, err = cli("build", str(recipe), "-w", url, "--executor", "local", "--no-progress")
    assert code == 0 and "nothing ran" in err, err
    assert s3_env.requests("PUT")[puts_before:] == []  # a rerun that is up to date writes no object

    # a new command has a mirror of its own, empty: what it reads comes from the bucket
    proc = run_cli("status", url)
    assert proc.returncode == 0 and "mine" in proc.stdout and "done" in proc.stdout, proc.stderr[-2000:]
    mirror.remove_folder(f"{url}/report")  # the build's; the command writes it again from the bucket's shards
    proc = run_cli("report", "-w", url)
    assert proc.returncode == 0 and f"{url}/report/report.html" in proc.stdout, proc.stderr[-2000:]
    report = json.loads(storage.read_bytes(f"{url}/report/report.json"))
    assert report["samples"] and report["mining"], "the report saw the work dir's records"
    code, out, err = cli("train", str(recipe), "-w", url, "--max-steps", "2", "--no-progress")
    assert code == 0, err
    assert storage.is_file(f"{url}/train/saferclip/last.pt")  # the checkpoint is in the bucket, to resume from


def test_ray_workers_publish_their_shards_to_the_bucket(s3_env, tmp_path, manifest_200):
    """On Ray the map stages' worker processes write the shards: into the node's mirror, then the bucket."""
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200, concurrency=2))
    url = f"s3://{BUCKET}/runs/ray"
    proc = run_cli("build", str(recipe), "-w", url, "--no-progress", env={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("build", str(recipe), "-w", str(tmp_path / "local"), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = _data_files(url)
    assert remote == _data_files(str(tmp_path / "local"))
    assert len([f for f in remote if f.count("/") == 1 and "/part-" in f]) == 16  # 2 stages x 4 shards x 2
    for name in remote:
        assert storage.read_bytes(f"{url}/{name}") == (tmp_path / "local" / name).read_bytes(), name
    markers = [f for f in storage.walk_files(url) if f.endswith(".done.json")]
    assert len(markers) == 8
    assert not list((tmp_path / "scratch").rglob("*.parquet"))  # the mirror went with the command


def test_a_work_dir_in_a_missing_bucket_is_one_line_naming_it(s3_env, tmp_path, manifest_200):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200))
    proc = run_cli("build", str(recipe), "-w", "s3://no-such-bucket/run", "--executor", "local", "--no-progress")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "s3://no-such-bucket/run" in lines[0] and "Traceback" not in proc.stderr
