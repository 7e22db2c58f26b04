"""One build per work dir at a time: a lock file that is created only if absent.

Two builds writing one work dir would race on the same temp names and markers; the second one must stop at once
and say who holds the dir. The lock is ``<workdir>/_lock.json``, made with an exclusive create (the same
conditional create an object store offers: write only if the object does not exist). It names its owner (host,
pid, the process's start time, the command, when) and is touched every ``HEARTBEAT`` seconds while the owner runs.

A lock is stale, and the next build takes it over, when its owner is gone: on the same host, no process with that
pid and start time; on another host (a shared work dir), no heartbeat for ``STALE_AFTER`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from saferclip_data.pipeline.errors import UserError

LOCK_FILE = "_lock.json"
HEARTBEAT = 20.0
STALE_AFTER = 120.0
#: a lock file still empty this long after its creation was left by a creator that died mid-write
EMPTY_GRACE = 10.0


def _process_started(pid: int) -> float | None:
    """The start time of process ``pid`` on this host, or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, owned by someone else: not ours to judge


class WorkDirLock:
    """``with WorkDirLock(root, "build"):`` holds the work dir for the block (see the module docstring)."""

    def __init__(self, root: Path, command: str):
        self.path = Path(root) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started(os.getpid()),
                      "command": command, "since": time.time(), "token": uuid.uuid4().hex}  # fmt: skip
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> WorkDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then created anew (another build may win that race)
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
                self._beat.start()
                return self
            holder = self._read()
            if not self._stale(holder):
                raise UserError(self._in_use(holder))
            self.path.unlink(missing_ok=True)
        raise UserError(self._in_use(self._read()))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if (self._read() or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _read(self) -> dict | None:
        """The holder's record; {} for a lock file being written (or left empty), None when there is none."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if not holder:
            return age > EMPTY_GRACE
        if holder.get("host") == self.owner["host"]:
            started = _process_started(int(holder.get("pid", -1)))
            return started is None or (started >= 0 and holder.get("started") is not None
                                       and abs(started - holder["started"]) > 1.0)  # fmt: skip
        return age > STALE_AFTER

    def _in_use(self, holder: dict | None) -> str:
        holder = holder or {}
        since = time.strftime("%H:%M:%S UTC", time.gmtime(holder.get("since", 0))) if holder.get("since") else "?"
        who = f"'{holder.get('command', '?')}' (pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        return (f"work dir {self.path.parent} is in use by {who}, since {since}): wait for it to finish; if that "
                f"process is gone from another host, remove {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
