"""`saferclip-data bench kills`: kill -9 a build at random moments, resume it, and compare with a clean build.

Each trial starts a build of the recipe in a fresh work dir (on the embedded Ray by default), SIGKILLs the build's
process (as the OOM killer or a user's ``kill -9`` would) inside one stage, the stages taken in turn: once the
stage has started, after a random share of the time it took in a clean build. It then waits 15 s, counts which of
the processes the build had started are still alive, builds again to the end and compares every file of the work
dir with the clean build's, byte for byte. Bookkeeping is left out of the
comparison: markers (``*.done.json``), manifests, task logs (``_tasks-*.json``) and the report (it states when it
was written).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from saferclip_data.pipeline import mirror, storage

BOOKKEEPING = ("_manifest.json", "_lock.json")


def data_files(work: Path) -> dict[str, Path]:
    """Every file of a work dir that holds data, by relative path (bookkeeping and the report left out)."""
    out = {}
    for path in sorted(work.rglob("*")):
        rel = path.relative_to(work)
        if not path.is_file() or rel.parts[0] == "report" or path.name in BOOKKEEPING:
            continue
        if path.name.endswith(".done.json") or path.name.startswith("_tasks-"):
            continue
        out[str(rel)] = path
    return out


def _build(recipe: Path, work: str, executor: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "saferclip_data.cli.main", "build", str(recipe), "-w", work,
               "--executor", executor, "--no-progress"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _manifests(work: str) -> list[str]:
    """The stages whose manifest is written, oldest first (a folder or a bucket's work dir)."""
    times = mirror.modified_times(work, "_manifest.json")
    return [rel.split("/")[0] for rel, _ in sorted(times.items(), key=lambda item: item[1]) if rel.count("/") == 1]


def _stage_running(work: str) -> str:
    """The stage whose manifest was opened last (the one running at the kill)."""
    manifests = _manifests(work)
    return manifests[-1] if manifests else "(start-up)"


def stage_seconds(work: str, view: Path) -> dict[str, float]:
    """Each stage of a finished build with the seconds it took, in build order (the order its manifests were
    written in ``work``; their contents read from the local ``view`` of it)."""
    return {name: float(json.loads((view / name / "_manifest.json").read_text()).get("seconds") or 0.0)
            for name in _manifests(work)}  # fmt: skip


def trial(recipe: Path, work: str, clean: dict[str, Path], stage: str, delay: float, executor: str,
          view: Path) -> dict:  # fmt: skip
    """One kill (``delay`` seconds after ``stage`` started), the 15 s wait, the resume and the comparison; a
    bucket's work dir is compared through a copy in ``view``."""
    import psutil

    poll = 0.5 if storage.is_url(work) else 0.05  # a bucket is asked by listing: not 20 times a second
    build = _build(recipe, work, executor)
    root = psutil.Process(build.pid)
    started: dict[int, psutil.Process] = {}
    began, end = time.monotonic(), None
    while build.poll() is None and (end is None or time.monotonic() < end):
        if end is None and stage in _manifests(work):
            end = time.monotonic() + delay
        try:
            started.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(poll)
    kill_at = time.monotonic() - began
    finished_first = build.poll() is not None
    stage = _stage_running(work)  # the stage actually running at the kill
    if not finished_first:
        os.kill(build.pid, signal.SIGKILL)
    build.wait()
    time.sleep(15)
    alive = []
    for proc in started.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.cmdline())[:100])
        except psutil.Error:
            pass
    resumed = _build(recipe, work, executor)
    err = resumed.communicate()[1]
    if resumed.returncode != 0:
        raise RuntimeError(f"resume after a kill at {kill_at:.1f} s failed: {err.strip().splitlines()[-1:]}")
    got = data_files(mirror.copy_folder(work, view))
    differ = sorted(rel for rel in clean.keys() & got.keys() if clean[rel].read_bytes() != got[rel].read_bytes())
    return {"kill_at_s": round(kill_at, 1), "stage": stage, "killed": not finished_first,
            "processes_seen": len(started), "alive_after_15s": alive, "files": len(clean),
            "missing": sorted(clean.keys() - got.keys()), "extra": sorted(got.keys() - clean.keys()),
            "differ": differ}  # fmt: skip


def run(recipe: Path, out: str, trials: int, seed: int, executor: str, views: Path) -> tuple[float, list[dict]]:
    """The clean build (timed), then ``trials`` kills at moments drawn uniformly over its duration. ``out`` may be
    a bucket URL: the work dirs are then in the bucket and compared through copies under ``views``."""
    clean_work = storage.join(out, "clean")
    mirror.remove_folder(clean_work)
    started = time.monotonic()
    build = _build(recipe, clean_work, executor)
    err = build.communicate()[1]
    if build.returncode != 0:
        raise RuntimeError(f"the clean build failed: {err.strip().splitlines()[-1:]}")
    seconds = time.monotonic() - started
    clean_view = mirror.copy_folder(clean_work, views / "clean")
    clean = data_files(clean_view)
    stages = {name: took for name, took in stage_seconds(clean_work, clean_view).items() if name != "report"}
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        work = storage.join(out, f"trial-{i:02d}")
        mirror.remove_folder(work)
        stage = list(stages)[i % len(stages)]
        results.append(trial(recipe, work, clean, stage, rng.uniform(0.0, 0.9) * stages[stage], executor,
                             views / "trial"))  # fmt: skip
        mirror.remove_folder(work)
    return seconds, results


def print_results(seconds: float, results: list[dict], executor: str, console: Any) -> None:
    """The trials' table, the two totals (nothing alive, outputs identical) and what went wrong where."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kill -9 inside each stage in turn of a {seconds:.0f} s build ({executor} executor), "
                  "then resume")
    for column in ("trial", "killed at s", "during", "processes", "alive 15 s later", "files equal"):
        table.add_column(column, justify="left" if column == "during" else "right")
    for i, r in enumerate(results):
        equal = r["files"] - len(r["differ"]) - len(r["missing"])
        table.add_row(str(i), f"{r['kill_at_s']:.1f}", r["stage"] if r["killed"] else "(finished first)",
                      str(r["processes_seen"]), str(len(r["alive_after_15s"])), f"{equal} / {r['files']}")
    Console(width=max(Console().width, 100)).print(table)
    clean = sum(not r["alive_after_15s"] for r in results)
    same = sum(not (r["differ"] or r["missing"] or r["extra"]) for r in results)
    console.print(f"nothing alive 15 s after the kill: {clean}/{len(results)}; "
                  f"outputs identical: {same}/{len(results)}")
    for r in results:
        for what in ("alive_after_15s", "differ", "missing", "extra"):
            if r[what]:
                console.print(f"  kill at {r['kill_at_s']} s: {what}: {r[what][:5]}")
