from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach a hub: set before huggingface_hub is imported (it reads this once, at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One cache per test session (toy worlds, the pretrained toy CLIP): shared by the tests, never the user's.
if "SAFERCLIP_TEST_KEEP_CACHE" not in os.environ:
    os.environ["SAFERCLIP_CACHE"] = tempfile.mkdtemp(prefix="saferclip-test-cache-")

from helpers import write_image_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "saferclip_data.cli.main"]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if any(Path(str(item.fspath)).name in TOY_CLIP_USERS for item in items):
        _pretrain_in_background(config)


#: test files that need the pretrained toy CLIP (the demo recipe's weights; minutes to train on 2 cores)
TOY_CLIP_USERS = {"test_toy_mining.py", "test_toy_pretrain.py", "test_training.py"}


def _pretrain_in_background(config) -> None:
    """Train the toy CLIP on one thread beside the tests that come before its users: much of the suite waits on
    subprocesses and Ray, so the other core is often idle. Its users take the same cache file under its lock
    (they wait for it, or find it done); the process is stopped when the session ends."""
    from saferclip_data.toyworld.pretrain import PretrainConfig, checkpoint_path

    if checkpoint_path(PretrainConfig()).is_file():
        return
    code = ("import torch; torch.set_num_threads(1)\n"
            "from saferclip_data.toyworld.pretrain import PretrainConfig, ensure_pretrained\n"
            "ensure_pretrained(PretrainConfig())")  # fmt: skip
    from saferclip_data.pipeline.workdir import cache_root

    cache_root().mkdir(parents=True, exist_ok=True)
    log = open(cache_root() / "background-pretrain.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    config.add_cleanup(lambda: (proc.kill(), proc.wait(), log.close()))


def recipe_dict(manifest: Path, **stage_overrides) -> dict:
    embed = {"batch_size": 32, "concurrency": 1, **stage_overrides}
    return {
        "name": "t",
        "source": {"kind": "manifest", "path": str(manifest), "shard_size": 50},
        "model": {"arch": "toy-vit-tiny", "pretrained": None, "init_seed": 0},
        "stages": {"embed": embed},
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def manifest_200(tmp_path_factory) -> Path:
    return write_image_manifest(tmp_path_factory.mktemp("src"), 200)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess: exit codes, stderr and Ray process isolation as a user sees them."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SAFERCLIP_MIRROR_")}  # an in-process run's
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli(capsys):
    """The CLI in-process (fast): returns (exit code, stdout, stderr)."""
    from saferclip_data.cli import main as cli_module

    def call(*args: str):
        old = sys.argv
        sys.argv = ["saferclip-data", *args]
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = old
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def _call_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in-process with its output captured: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from saferclip_data.cli import main as cli_module

    old = sys.argv
    sys.argv = ["saferclip-data", *args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_module.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_module():
    """The CLI in-process for module-scoped fixtures: returns (exit code, stdout, stderr)."""
    return _call_cli


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One small safety build with a benchmark, shards and a report, shared by the benchmark/shards and the
    training tests (their work dir; the recipe is ``../r.yaml``)."""
    from helpers import safety_recipe

    base = tmp_path_factory.mktemp("bench")
    work = base / "w"
    recipe = safety_recipe(work)
    recipe["stages"]["benchmark"] = {
        "splits": ["shift"],
        "size": 14,
        "alignment_percentile": 0,
        "caption_similarity_percentile": 0,
        "duplicate_threshold": 1.0,
    }
    recipe["stages"]["shards"] = {"samples_per_shard": 40, "exclude_splits": ["test"]}
    recipe["stages"]["report"] = {"samples": 6}
    path = write_recipe(base / "r.yaml", recipe)
    code, _, err = _call_cli("build", str(path), "--executor", "local", "--no-progress")
    assert code == 0, err
    return work
