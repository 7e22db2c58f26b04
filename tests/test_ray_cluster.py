"""A real two-node Ray cluster on this host (`ray start --head` + `ray start --address`): same outputs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saferclip_data.pipeline.workdir import WorkDir

from conftest import CLI, recipe_dict, run_cli, write_recipe

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
CLUSTER_NODES: dict[str, list[subprocess.Popen]] = {}  # address -> [head, worker] `ray start --block` processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _cluster(log_dir: Path, head_cpus: int, node_env: tuple[dict, dict] = ({}, {})):
    """Head and worker started with --block, so stopping them stops exactly the processes this test made; the
    worker's process is ``CLUSTER_NODES[address][1]``."""
    port = _free_port()
    common = ["--object-store-memory=150000000", "--disable-usage-stats", "--block"]
    logs = [open(log_dir / f"ray-{n}.log", "w") for n in ("head", "worker")]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--num-cpus={head_cpus}", *common],
        env={**ENV, **node_env[0]},
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        _wait_for_nodes(address, 1, head)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", "--num-cpus=1", *common],
            env={**ENV, **node_env[1]},
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        )
        nodes = [head, worker]
        _wait_for_nodes(address, 2, worker)
        CLUSTER_NODES[address] = nodes
        yield address
    finally:
        CLUSTER_NODES.pop(address, None)
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


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """One cluster for the tests that leave it as they found it (starting one takes ~15 s): a head with 2 CPUs,
    a worker with 1; the executors spread tasks and actors over both."""
    with _cluster(tmp_path_factory.mktemp("cluster-logs"), head_cpus=2) as address:
        yield address


@pytest.fixture
def own_two_node_cluster(tmp_path):
    """A cluster of the test's own, for a test that kills one of its nodes (that test comes first in the file, so
    its cluster is gone before the shared one starts)."""
    with _cluster(tmp_path, head_cpus=2) as address:
        yield address


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


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a `ray start --block` process and everything it started (raylet, workers): a node lost."""
    import psutil

    parent = psutil.Process(proc.pid)
    victims = [parent, *parent.children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(victims)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(RAY) is None and not Path(RAY).exists(), reason="ray CLI not installed")
def test_losing_a_worker_node_mid_build_still_completes_with_identical_outputs(tmp_path, manifest_200,
                                                                              own_two_node_cluster):  # fmt: skip
    data = recipe_dict(manifest_200, concurrency=2, batch_size=8)
    data["source"]["shard_size"] = 10  # 20 shards: enough work in flight when the node goes
    recipe = write_recipe(tmp_path / "r.yaml", data)
    cluster_work, local_work = tmp_path / "cluster", tmp_path / "local"
    env = {**ENV, "PYTHONUNBUFFERED": "1"}
    build = subprocess.Popen(
        [*CLI, "build", str(recipe), "-w", str(cluster_work), "--ray-address", own_two_node_cluster, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker_node = CLUSTER_NODES[own_two_node_cluster][1]
    deadline = time.time() + 240
    while time.time() < deadline and build.poll() is None:
        done = list((cluster_work / "embed").glob("*.done.json"))
        nodes = {json.loads(p.read_text())["worker"]["node"] for p in done}
        if len(nodes) == 2 and len(done) >= 3:  # both nodes are embedding
            break
        time.sleep(0.2)
    assert build.poll() is None, f"the build ended before the node could be lost: {build.stderr.read()[-2000:]}"
    assert len(nodes) == 2, "the worker node never embedded a shard before the deadline"
    killed_at = len(list((cluster_work / "embed").glob("*.done.json")))
    assert killed_at < 20 and _kill_tree(worker_node) >= 2
    out, err = build.communicate(timeout=400)
    assert build.returncode == 0, err[-3000:]

    _assert_same_as_local(recipe, cluster_work, local_work, parts=80)  # 2 stages x 20 shards x (output, rejects)
    # every shard is done; one the worker node finished just before the loss may carry the head node's marker
    # (its result never reached the driver, so it ran again there): which node ends up named is a race
    after = [json.loads(p.read_text())["worker"]["node"] for p in (cluster_work / "embed").glob("*.done.json")]
    assert len(after) == 20 and set(after) <= nodes


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
    _assert_same_as_local(recipe, cluster_work, local_work, parts=16)  # 2 stages x 4 shards x (output, rejects)
    nodes = {json.loads(p.read_text())["worker"]["node"] for p in (cluster_work / "embed").glob("*.done.json")}
    assert len(nodes) == 2, "both nodes of the cluster embedded shards"


def _assert_same_as_local(recipe, cluster_work, local_work, parts: int) -> None:
    """The same recipe built in-process writes byte-identical parquet files to those the cluster wrote."""
    proc = run_cli("build", str(recipe), "-w", str(local_work), "--executor", "local", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    produced = sorted(p.relative_to(cluster_work) for p in cluster_work.glob("*/part-*.parquet"))
    assert len(produced) == parts
    for rel in produced:
        assert (cluster_work / rel).read_bytes() == (local_work / rel).read_bytes(), rel


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(RAY) is None and not Path(RAY).exists(), reason="ray CLI not installed")
def test_partitioned_dedup_spreads_its_tasks_over_both_nodes_and_matches_local(tmp_path, two_node_cluster):
    """The partitioned dedup's search and write tasks run on both nodes; the outputs equal an in-process run."""

    from saferclip_data.bench.scale import SyntheticPool, write_pool
    from saferclip_data.pipeline.executors import LocalExecutor, RayExecutor
    from saferclip_data.pipeline.worker import StageJob
    from saferclip_data.stages.dedup import DedupConfig, DedupStage

    os.environ["RAY_AUTH_MODE"] = "disabled"
    pool = SyntheticPool(rows=8_000, dim=32, shard_rows=1_000, clusters=20)
    works = {}
    for name in ("cluster", "local"):
        works[name] = tmp_path / name
        write_pool(works[name], pool)
    config = DedupConfig(partition_rows=500, task_rows=1_000)
    ray_executor = RayExecutor(two_node_cluster)
    try:
        clustered = ray_executor.run_global(StageJob(DedupStage, config, {}, str(works["cluster"])))
    finally:
        ray_executor.close()
    local = LocalExecutor().run_global(StageJob(DedupStage, config, {}, str(works["local"])))
    assert clustered["counts"] == local["counts"] and clustered["counts"]["rejected"] > 0
    markers = list((works["cluster"] / "dedup").glob("*.done.json"))
    assert len(markers) == 8 and len({json.loads(p.read_text())["worker"]["node"] for p in markers}) == 2
    searches = WorkDir(works["cluster"]).task_log("dedup", "partitions")
    assert len(searches) >= 2 and len({s["node"] for s in searches}) == 2
    for marker in markers:
        shard = marker.name.removesuffix(".done.json")
        for suffix in (".parquet", ".rejects.parquet"):
            cluster_bytes = (works["cluster"] / "dedup" / f"{shard}{suffix}").read_bytes()
            assert cluster_bytes == (works["local"] / "dedup" / f"{shard}{suffix}").read_bytes(), shard


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(RAY) is None and not Path(RAY).exists(), reason="ray CLI not installed")
def test_two_nodes_that_share_only_a_bucket_build_the_scaled_stages_as_a_local_build(tmp_path, monkeypatch):
    """Nothing shared but an S3 server: the source and the work dir are in the bucket, and the driver, the head
    node and the worker node each have a scratch dir of their own. A precomputed-embedding build with the scale
    paths forced (partitioned dedup, IVF neighbours, streaming mine, task-parallel shards): each of those stages
    ran on both nodes, and every output equals an in-process build's on local disk, byte for byte."""
    pytest.importorskip("moto")
    from s3_server import S3Server, use_server_env

    from saferclip_data.pipeline import mirror, storage

    from embedding_layouts import planted_pool, write_clip_retrieval

    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(3_000, 128), parts=3, url="")
    stages = {
        "embed": {"concurrency": 2},
        "score": {"role_column": "label", "concurrency": 2},
        "filter": {"role_from": "labels"},
        "dedup": {"partition_rows": 300, "task_rows": 600},
        "neighbours": {"index": "ivf_flat", "nlist": 16, "concurrency": 2, "candidates": 4, "task_queries": 60},
        "mine": {"k": 2, "reuse_cap": 4},
        "shards": {"samples_per_shard": 100, "plain_view": False},
    }
    with S3Server() as s3:
        use_server_env(monkeypatch, s3)
        source = s3.upload(folder, "pool", "laion")
        data = {"name": "scaled", "source": {"kind": "embeddings", "path": source, "shard_size": 500},
                "model": {"arch": "toy-vit-tiny", "pretrained": None}, "stages": stages}  # fmt: skip
        recipe = write_recipe(tmp_path / "r.yaml", data)
        scratch = [{**s3.env, "SAFERCLIP_SCRATCH": str(tmp_path / f"scratch-{n}")} for n in ("head", "worker")]
        url = "s3://pool/work"
        with _cluster(tmp_path, head_cpus=2, node_env=(scratch[0], scratch[1])) as address:
            proc = run_cli("build", str(recipe), "-w", url, "--ray-address", address, "--no-progress",
                           env={"RAY_AUTH_MODE": "disabled", "SAFERCLIP_SCRATCH": str(tmp_path / "scratch-driver")})
            assert proc.returncode == 0, proc.stderr[-3000:]
        cluster_work = mirror.copy_folder(url, tmp_path / "cluster")
    for stage in ("dedup", "neighbours", "mine", "shards"):
        # the nodes that wrote its shards, and those of the tasks of its steps (dedup's partition searches,
        # neighbours' pool pieces and list searches, ...)
        nodes = {json.loads(p.read_text())["worker"]["node"] for p in (cluster_work / stage).glob("*.done.json")}
        for log in (cluster_work / stage).glob("_tasks-*.json"):
            nodes |= {task["node"] for task in json.loads(log.read_text()) if "node" in task}
        assert len(nodes) == 2, f"{stage} ran on {len(nodes)} node(s)"
    local_work = tmp_path / "local"
    data["source"]["path"] = str(folder)
    proc = run_cli("build", str(write_recipe(tmp_path / "local.yaml", data)), "-w", str(local_work), "--executor",
                   "local", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    produced = sorted(p.relative_to(cluster_work) for p in cluster_work.glob("*/part-*.parquet"))
    assert len(produced) == 8 * 6 * 2  # 8 stages x 6 shards x (output, rejects)
    tars = sorted(p.relative_to(cluster_work) for p in cluster_work.glob("shards/quad/*.tar"))
    assert tars and sorted(p.relative_to(local_work) for p in local_work.glob("shards/quad/*.tar")) == tars
    for rel in [*produced, *tars, Path("mine/targets.parquet"), Path("shards/selection.parquet")]:
        assert (cluster_work / rel).read_bytes() == (local_work / rel).read_bytes(), rel
    assert storage.walk_files(str(tmp_path / "scratch-worker"))  # the worker node worked in a scratch dir of its own


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(shutil.which(RAY) is None and not Path(RAY).exists(), reason="ray CLI not installed")
def test_downloads_run_as_tasks_on_both_nodes_and_match_a_local_build(tmp_path, two_node_cluster):
    """``source.download``: img2dataset runs as a task per ``samples_per_shard`` URLs spread over the cluster (the
    attempt's tasks.json names each task's node), and the records equal an in-process build's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loopback import Server, image_bytes

    def static(body):
        return lambda request: (200, "image/png", body)

    colours = [(i * 5 % 256, i * 11 % 256, i * 17 % 256) for i in range(20)]
    routes = {f"/{i}.png": static(image_bytes("PNG", c, 40)) for i, c in enumerate(colours)}
    with Server(routes) as server:
        manifest = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"key": [f"r{i:03d}" for i in range(20)], "caption": [f"colour {i}" for i in range(20)],
                                 "url": [f"{server.url}/{i}.png" for i in range(20)]}), manifest)  # fmt: skip
        data = {"name": "fetch", "model": {"arch": "toy-vit-tiny", "pretrained": None}, "stages": {},
                "source": {"kind": "manifest", "path": str(manifest), "image_column": "url", "shard_size": 10,
                           "download": {"image_size": 32, "threads": 2, "samples_per_shard": 5}}}  # fmt: skip
        recipe = write_recipe(tmp_path / "r.yaml", data)
        cluster_work, local_work = tmp_path / "cluster", tmp_path / "local"
        proc = run_cli("build", str(recipe), "-w", str(cluster_work), "--ray-address", two_node_cluster,
                       "--no-progress", env={"RAY_AUTH_MODE": "disabled"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        tasks = json.loads((cluster_work / "downloads" / "attempt-1" / "tasks.json").read_text())
        assert len(tasks) == 4 and sum(t["urls"] for t in tasks) == 20
        assert len({t["node"] for t in tasks}) == 2, tasks
        proc = run_cli("build", str(recipe), "-w", str(local_work), "--executor", "local", "--no-progress")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert WorkDir(cluster_work).manifest("source")["counts"]["out"] == 20
    produced = sorted(p.relative_to(cluster_work) for p in cluster_work.glob("source/part-*.parquet"))
    assert len(produced) == 4  # 2 shards x (output, rejects)
    for rel in produced:
        assert (cluster_work / rel).read_bytes() == (local_work / rel).read_bytes(), rel
