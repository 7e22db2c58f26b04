"""A watchdog for the embedded Ray: when the build's process dies without shutting Ray down (SIGKILL, OOM
killer), the Ray processes it started (GCS, raylet, its agents, workers) would live on. The watchdog is a small
process of its own session (a signal to the build's process group does not reach it) that polls the build's
process, remembering its descendants, and once it is gone kills them and every process of that Ray session.
A build that ends normally stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def start(session_dir: str) -> subprocess.Popen:
    """Watch this process; kill the Ray session in ``session_dir`` when it dies."""
    return subprocess.Popen(
        [sys.executable, "-m", "saferclip_data.pipeline.ray_watchdog", str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def session_processes(session_dir: str) -> list:
    """Processes of one Ray session: those naming its folder on their command line, and their descendants
    (none for an empty name: the build's own descendants are what is watched then)."""
    import psutil

    if not session_dir:
        return []
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session_dir in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def watch(pid: int, session_dir: str, every: float = 0.2) -> None:
    """Poll ``pid``; meanwhile remember its descendants (once it dies, Ray's agents are orphans whose command
    lines no longer name the session); then kill those and every process naming the session."""
    import psutil

    known: dict[int, psutil.Process] = {}
    while True:
        try:
            build = psutil.Process(pid)
            if build.status() == psutil.STATUS_ZOMBIE:
                break
            known.update((p.pid, p) for p in build.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        time.sleep(every)
    sweep(known, session_dir)


def sweep(known: dict, session_dir: str, quiet_rounds: int = 3, limit: float = 10.0) -> None:
    """Kill the remembered processes, those naming the session and every descendant of either, again and again
    until ``quiet_rounds`` sweeps in a row find nothing alive: a raylet killed mid-spawn can leave a worker
    that starts after the first sweep, an orphaned agent can fork once more."""
    import psutil

    deadline, quiet = time.monotonic() + limit, 0
    while quiet < quiet_rounds and time.monotonic() < deadline:
        victims = {**known, **{p.pid: p for p in session_processes(session_dir)}}
        for proc in list(victims.values()):
            try:
                victims.update((c.pid, c) for c in proc.children(recursive=True))
            except psutil.Error:
                pass
        victims.pop(os.getpid(), None)
        alive = []
        for proc in victims.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # psutil compares start times
                    proc.kill()
                    alive.append(proc)
            except psutil.Error:
                pass
        known = {p.pid: p for p in alive}
        quiet = 0 if alive else quiet + 1
        time.sleep(0.2)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
