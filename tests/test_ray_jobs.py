"""Run the way Ray users run jobs: `ray job submit -- saferclip-data build ...` through the Jobs API of a local
`ray start --head` (its dashboard on loopback), and the cluster manifests under docs/ parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from s3_server import free_port

from conftest import REPO, recipe_dict, run_cli, write_recipe

RAY = str(Path(sys.executable).with_name("ray"))
BIN = str(Path(sys.executable).parent)


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start exited early"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no Jobs API at {url}")


@pytest.fixture
def ray_head(tmp_path):
    """A head node with its dashboard (the Jobs API) on 127.0.0.1; yields the dashboard URL."""
    pytest.importorskip("ray.dashboard.modules.job.sdk")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=2", "--object-store-memory=150000000",
         "--disable-usage-stats", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(url, head)
        yield url
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_builds_on_the_cluster_as_the_local_build_does(tmp_path, manifest_200, ray_head):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200, concurrency=2))
    work, local = tmp_path / "job-work", tmp_path / "local-work"
    runtime_env = json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    for _ in range(12):  # the head answers before its job agent is up: "No available agent", try again later
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", ray_head, "--runtime-env-json", runtime_env, "--",
             "saferclip-data", "build", str(recipe), "-w", str(work), "--no-progress"],
            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if "No available agent" not in submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower(), submit.stdout[-3000:]
    markers = [json.loads(p.read_text()) for p in (work / "embed").glob("*.done.json")]
    with urllib.request.urlopen(f"{ray_head}/api/v0/nodes", timeout=10) as response:
        cluster_nodes = {n["node_id"] for n in json.loads(response.read())["data"]["result"]["result"]}
    # the job joined the cluster it was submitted to (RAY_ADDRESS), not an embedded Ray of its own
    assert len(markers) == 4 and {m["worker"]["node"] for m in markers} <= cluster_nodes, (markers, cluster_nodes)
    proc = run_cli("build", str(recipe), "-w", str(local), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    produced = sorted(p.relative_to(work) for p in work.glob("*/part-*.parquet"))
    assert len(produced) == 16
    for rel in produced:
        assert (work / rel).read_bytes() == (local / rel).read_bytes(), rel


def test_the_cluster_examples_parse_and_run_the_documented_command():
    """docs/cluster/: a KubeRay RayJob and a `ray up` cluster YAML (parsed here; neither was run on a cloud)."""
    job = yaml.safe_load((REPO / "docs" / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("saferclip-data build ")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"][0]["replicas"] >= 1
    env = {e["name"] for c in (spec["headGroupSpec"]["template"]["spec"]["containers"]
                               + spec["workerGroupSpecs"][0]["template"]["spec"]["containers"])
           for e in c.get("env", [])}  # fmt: skip
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    cluster = yaml.safe_load((REPO / "docs" / "cluster" / "ray-up.yaml").read_text())
    assert cluster["cluster_name"] and cluster["provider"]["type"] in ("aws", "gcp", "azure")
    assert any("saferclip-data" in line for line in cluster["setup_commands"])
    assert cluster["max_workers"] >= 1 and cluster["head_node_type"] in cluster["available_node_types"]
