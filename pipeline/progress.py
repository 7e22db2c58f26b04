"""Build progress: rich bars on a terminal, timestamped lines elsewhere (CI, ``| tee``, nohup, schedulers), and
the final summary table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


@dataclass
class StageOutcome:
    stage: str
    status: str  # "up to date", "ran", "resumed"
    shards: int = 0
    shards_run: int = 0
    records_in: int = 0
    records_out: int = 0
    rejected: int = 0
    seconds: float = 0.0
    parent: str = ""  # a preparatory step (pretraining, an index) of this stage, shown under it


class RecordsPerSecond(ProgressColumn):
    """Records per second (rich's speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "rec")
        return Text(
            f"{speed:,.1f} {unit}/s" if speed and speed < 10 else f"{speed:,.0f} {unit}/s" if speed else "",
            style="progress.data.speed",
        )


class BuildProgress:
    """One bar per stage; ``advance`` takes records, ``shard_done`` moves the shard counter. ``steps`` keeps the
    time of each preparatory step (pretraining, an index) for the summary."""

    def __init__(self, console: Console, enabled: bool = True):
        self.steps: list[StageOutcome] = []
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RecordsPerSecond(),
            TextColumn("shards {task.fields[shards]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = None
        self._shards_done = 0
        self._shards_total = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def begin(self, name: str) -> None:
        """A stage is about to plan and prepare (before its bar exists)."""
        self._stage = name

    def start_stage(self, name: str, records: int | None, shards_done: int, shards_total: int) -> None:
        self._shards_done, self._shards_total = shards_done, shards_total
        self._task = self.progress.add_task(name, total=records, shards=f"{shards_done}/{shards_total}")

    def subtask(self, name: str, total: int | None):
        """A bar for preparatory work (e.g. pretraining); returns a function that advances it. Its time goes
        into ``steps`` (until the stage's own bar starts)."""
        task = self.progress.add_task(name, total=total, shards="-", unit="step")
        step = StageOutcome(f"  {name}", "ran", records_in=total or 0, parent=getattr(self, "_stage", ""))
        self.steps.append(step)
        started = time.perf_counter()

        def advance(n: int = 1) -> None:
            self.progress.advance(task, n)
            step.seconds = time.perf_counter() - started

        return advance

    def advance(self, records: int) -> None:
        self.progress.advance(self._task, records)

    def global_done(self, records: int) -> None:
        """A whole-data-set stage has no per-record progress: fill its bar with its record count at the end."""
        self.progress.update(self._task, total=records, completed=records)
        self.shard_done({})

    def shard_done(self, _stats: dict) -> None:
        self._shards_done += 1
        self.progress.update(self._task, shards=f"{self._shards_done}/{self._shards_total}")

    def finish_stage(self) -> None:
        """Close the bar at what was done (the total may have been unknown, e.g. for tar sources)."""
        task = next(t for t in self.progress.tasks if t.id == self._task)
        self.progress.update(self._task, total=task.completed)


class LineProgress(BuildProgress):
    """Progress as timestamped lines, for output that is not a terminal: a line when a stage (or a preparatory
    step) starts and ends, and one every ``every`` seconds while it runs (done/total, rate, ETA), from a
    heartbeat thread so that a long step without progress calls still shows it is alive."""

    def __init__(self, console: Console, enabled: bool = True, every: float = 15.0):
        self.console, self.enabled, self.every = console, enabled, every
        self.steps = []
        self._lock = threading.Lock()
        self._current: _Running | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="progress-lines", daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _say(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False, soft_wrap=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                run = self._current
                if run is None or time.perf_counter() - run.last_line < self.every:
                    continue
                run.last_line = time.perf_counter()
                line = run.describe()
            self._say(line)

    def _switch(self, run: _Running | None) -> None:
        with self._lock:
            self._current = run

    def begin(self, name: str) -> None:
        self._stage = name
        self._say(f"{name}: starting")
        self._switch(_Running(name, None, "rec"))

    def start_stage(self, name: str, records: int | None, shards_done: int, shards_total: int) -> None:
        self._shards_done, self._shards_total = shards_done, shards_total
        total = f"{records:,} records, " if records else ""
        self._say(f"{name}: running ({total}{shards_done}/{shards_total} shards done before)")
        self._switch(_Running(name, records, "rec", shards=f"{shards_done}/{shards_total}"))

    def subtask(self, name: str, total: int | None):
        self._say(f"{name}: starting" + (f" ({total:,} steps)" if total else ""))
        run = _Running(name, total, "step")
        step = StageOutcome(f"  {name}", "ran", records_in=total or 0, parent=getattr(self, "_stage", ""))
        self.steps.append(step)
        previous = self._current
        self._switch(run)

        def advance(n: int = 1) -> None:
            with self._lock:
                run.done += n
                step.seconds = time.perf_counter() - run.started
            if total and run.done >= total:
                self._say(f"{name}: done in {step.seconds:,.1f} s")
                self._switch(previous)

        return advance

    def advance(self, records: int) -> None:
        with self._lock:
            if self._current is not None:
                self._current.done += records

    def global_done(self, records: int) -> None:
        with self._lock:
            if self._current is not None:
                self._current.done = self._current.total = records

    def shard_done(self, _stats: dict) -> None:
        self._shards_done += 1
        with self._lock:
            if self._current is not None:
                self._current.shards = f"{self._shards_done}/{self._shards_total}"

    def finish_stage(self) -> None:
        with self._lock:
            run, self._current = self._current, None
        if run is not None:
            self._say(f"{run.name}: finished in {time.perf_counter() - run.started:,.1f} s ({run.done:,} {run.unit})")


@dataclass
class _Running:
    """What the line printer knows of the step that runs now."""

    name: str
    total: int | None
    unit: str
    shards: str = ""
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_line: float = field(default_factory=time.perf_counter)

    def describe(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.name}: {self.done:,}" + (f"/{self.total:,} {self.unit}" if self.total else f" {self.unit}")]
        if self.total:
            parts.append(f"{100 * self.done / self.total:.0f}%")
        if self.done:
            parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.shards:
            parts.append(f"shards {self.shards}")
        parts.append(f"{elapsed:,.0f} s elapsed")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {(self.total - self.done) / rate:,.0f} s")
        return ", ".join(parts)


def build_progress(console: Console, enabled: bool = True, mode: str = "auto") -> BuildProgress:
    """Bars on a terminal, lines elsewhere (``mode`` auto), or as asked (bars, lines)."""
    if mode == "lines" or (mode == "auto" and not console.is_terminal):
        return LineProgress(console, enabled)
    return BuildProgress(console, enabled)


def summary_table(outcomes: list[StageOutcome], title: str = "build summary", steps: list[StageOutcome] = ()) -> Table:
    """Stages in order, each followed by its preparatory steps (their seconds are part of the stage's)."""
    table = Table(title=title)
    for column in ("stage", "status", "shards run", "in", "out", "rejected", "seconds"):
        table.add_column(column, justify="left" if column in ("stage", "status") else "right")
    for o in outcomes:
        table.add_row(o.stage, o.status, f"{o.shards_run}/{o.shards}", f"{o.records_in:,}", f"{o.records_out:,}",
                      f"{o.rejected:,}", f"{o.seconds:.1f}")  # fmt: skip
        for step in (s for s in steps if s.parent == o.stage):
            table.add_row(step.stage, "step", "-", f"{step.records_in:,}", "-", "-", f"{step.seconds:.1f}")
    return table


@contextmanager
def step_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int, float | None], None]]:
    """A bar for an iterative job (training): yields ``update(step, total, value)``; ``value`` (a loss, say) is
    shown as it comes, None keeps the last one. The first update may start past 0 (a resumed run)."""
    progress = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RecordsPerSecond(),
        TextColumn("{task.fields[value]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    task = progress.add_task(description, total=None, unit="step", value="")

    def update(step: int, total: int, value: float | None) -> None:
        fields = {"value": f"loss {value:.4f}"} if value is not None else {}
        progress.update(task, completed=step, total=total, **fields)

    with progress:
        yield update
