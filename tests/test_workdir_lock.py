"""One build per work dir: a second build stops at once naming the owner; a dead owner's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.lock import LOCK_FILE, WorkDirLock

from conftest import recipe_dict, write_recipe

HOLD = """
import sys, time
from pathlib import Path
from saferclip_data.pipeline.lock import WorkDirLock
with WorkDirLock(Path(sys.argv[1]), "saferclip-data build"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(work) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_build_stops_naming_the_owner_and_a_killed_owners_lock_is_taken_over(tmp_path, cli, manifest_200):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200))
    owner = _holder(work)
    try:
        started = time.monotonic()
        code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
        assert time.monotonic() - started < 5.0
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"pid {owner.pid}" in err and "saferclip-data build" in err and str(work) in err
        assert not (work / "source").exists()  # nothing was written beside the owner
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert (work / LOCK_FILE).is_file()  # left behind by the killed owner
    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0, err
    assert not (work / LOCK_FILE).exists()  # released when the build ended


def test_a_lock_is_stale_only_when_its_owner_is_gone(tmp_path):
    with WorkDirLock(tmp_path, "first"), pytest.raises(UserError, match="in use by 'first'"):
        with WorkDirLock(tmp_path, "second"):
            pass
    # another host's lock: stale only once its heartbeat is old
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "build", "since": 0}))
    with pytest.raises(UserError, match="on elsewhere"):
        with WorkDirLock(tmp_path, "mine"):
            pass
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with WorkDirLock(tmp_path, "mine") as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.owner["token"]
    # a pid of this host that is running, but a different process than the one that took the lock
    record = {"host": lock.owner["host"], "pid": os.getpid(), "started": 1.0, "command": "build", "since": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with WorkDirLock(tmp_path, "mine"):
        pass
