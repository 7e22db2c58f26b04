"""A real two-node Ray cluster on this host (`ray start --head` + `ray start --address`): same outputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import recipe_dict, run_cli, write_recipe

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    """Head and worker started with --block, so stopping them stops exactly the processes this test made."""
    port = _free_port()
    common = ["--num-cpus=1", "--object-store-memory=150000000", "--disable-usage-stats", "--block"]
    logs = [open(tmp_path / f"ray-{n}.log", "w") for n in ("head", "worker")]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        env=ENV,
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        _wait_for_nodes(address, 1, head)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", *common], env=ENV, stdout=logs[1], stderr=subprocess.STDOUT
        )
        nodes = [head, worker]
        _wait_for_nodes(address, 2, worker)
        yield address
    finally:
        for proc in reversed(nodes or [head]):
            proc.terminate()
        for proc in reversed(nodes or [head]):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        # `ray start` records the newest cluster for later `ray.init()` calls; do not leave ours behind
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _wait_for_nodes(address: str, count: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    probe = (
        "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start exited early"
        out = subprocess.run([sys.executable, "-c", probe, address], env=ENV, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} did not reach {count} nodes")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(RAY) is None and not Path(RAY).exists(), reason="ray CLI not installed")
def test_build_on_two_node_cluster_matches_local(tmp_path, manifest_200, two_node_cluster):
    data = recipe_dict(manifest_200, concurrency=2)
    data["source"]["concurrency"] = 2
    recipe = write_recipe(tmp_path / "r.yaml", data)
    cluster_work, local_work = tmp_path / "cluster", tmp_path / "local"
    proc = run_cli(
        "build",
        str(recipe),
        "-w",
        str(cluster_work),
        "--ray-address",
        two_node_cluster,
        "--no-progress",
        env={"RAY_AUTH_MODE": "disabled"},
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("build", str(recipe), "-w", str(local_work), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    produced = sorted(p.relative_to(cluster_work) for p in cluster_work.glob("*/part-*.parquet"))
    assert len(produced) == 16  # 2 stages x 4 shards x (output, rejects)
    for rel in produced:
        assert (cluster_work / rel).read_bytes() == (local_work / rel).read_bytes(), rel
    nodes = {json.loads(p.read_text())["worker"]["node"] for p in (cluster_work / "embed").glob("*.done.json")}
    assert len(nodes) == 2, "both nodes of the cluster embedded shards"
