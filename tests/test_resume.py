"""Crash safety: SIGKILL mid-embed, rerun, and get exactly what an uninterrupted run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CLI, recipe_dict, run_cli, write_recipe
from helpers import write_image_manifest


def _outputs(work) -> dict[str, bytes]:
    """Every data file the build writes (parquet outputs and rejects), by relative path."""
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.glob("*/part-*.parquet"))}


@pytest.mark.slow
def test_sigkill_mid_embed_then_resume_is_byte_identical(tmp_path):
    manifest = write_image_manifest(tmp_path / "m", 400, corrupt=(13, 250), empty_caption=(77,))
    data = recipe_dict(manifest, batch_size=5)
    data["source"]["shard_size"] = 10
    recipe = write_recipe(tmp_path / "r.yaml", data)

    clean = tmp_path / "clean"
    proc = run_cli("build", str(recipe), "-w", str(clean), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    work = tmp_path / "killed"
    build = subprocess.Popen(
        [*CLI, "build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    markers = []
    while time.time() < deadline and build.poll() is None:
        markers = list((work / "embed").glob("*.done.json"))
        if len(markers) >= 3:
            os.kill(build.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    build.wait()
    assert build.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done_at_kill = len(list((work / "embed").glob("*.done.json")))
    assert 3 <= done_at_kill < 40, done_at_kill

    proc = run_cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "resumed" in proc.stderr  # the embed stage resumed: it did not start over

    assert _outputs(work) == _outputs(clean)
    assert not list(work.glob("*/.*.tmp-*")), "temp files of the killed run are cleaned up"
    keys = pa.concat_tables([pq.read_table(p, columns=["key"]) for p in sorted(work.glob("embed/part-*[0-9].parquet"))])
    rejected = pa.concat_tables([pq.read_table(p) for p in sorted(work.glob("*/part-*.rejects.parquet"))])
    all_keys = keys["key"].to_pylist() + rejected["key"].to_pylist()
    assert len(all_keys) == len(set(all_keys)) == 400  # none twice, none missing
    assert sorted(rejected["reason"].to_pylist()) == ["missing caption", "undecodable image", "undecodable image"]
