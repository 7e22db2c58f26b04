"""Rich progress bars per stage (records/s, ETA) and the final summary table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    """One bar per stage; ``advance`` takes records, ``shard_done`` moves the shard counter."""

    def __init__(self, console: Console, enabled: bool = True):
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

    def start_stage(self, name: str, records: int | None, shards_done: int, shards_total: int) -> None:
        self._shards_done, self._shards_total = shards_done, shards_total
        self._task = self.progress.add_task(name, total=records, shards=f"{shards_done}/{shards_total}")

    def subtask(self, name: str, total: int | None):
        """A bar for preparatory work (e.g. pretraining); returns a function that advances it."""
        task = self.progress.add_task(name, total=total, shards="-", unit="step")
        return lambda n=1: self.progress.advance(task, n)

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


def summary_table(outcomes: list[StageOutcome], title: str = "build summary") -> Table:
    table = Table(title=title)
    for column in ("stage", "status", "shards run", "in", "out", "rejected", "seconds"):
        table.add_column(column, justify="left" if column in ("stage", "status") else "right")
    for o in outcomes:
        table.add_row(
            o.stage,
            o.status,
            f"{o.shards_run}/{o.shards}",
            f"{o.records_in:,}",
            f"{o.records_out:,}",
            f"{o.rejected:,}",
            f"{o.seconds:.1f}",
        )
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
