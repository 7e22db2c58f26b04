"""The ``saferclip-data`` command line: build, validate, plan and status.

User mistakes (a bad recipe, a missing file, an empty source) print one line and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from saferclip_data.cli.common import open_pipeline, opened_workdir, work_dir_of
from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.lock import WorkDirLock
from saferclip_data.pipeline.progress import build_progress, summary_table
from saferclip_data.pipeline.runner import Pipeline
from saferclip_data.pipeline.status import stage_status

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Build safety datasets for CLIP: embed, filter and pair unsafe/safe image-caption data into a work dir.",
)
console = Console(stderr=True)


class ExecutorKind(str, Enum):
    ray = "ray"
    local = "local"


class ProgressStyle(str, Enum):
    auto = "auto"
    bars = "bars"
    lines = "lines"


def next_steps(pipeline: Pipeline, recipe: Path | None, workdir: str | None = None) -> list[str]:
    """The build's closing lines: where its results are and the commands that come next (with ``-w`` when the
    work dir was given on the command line, so they find it)."""
    root = pipeline.workdir.location
    target = " ".join(filter(None, [str(recipe) if recipe else "", f"-w {root}" if workdir else ""]))
    lines = [f"work dir: {root}"]
    names = [p.name for p in pipeline.stages]
    if "report" in names:
        lines.append(f"audit report: {storage.join(root, 'report', 'report.html')} (also report.md, report.json)")
    if "shards" in names:
        lines.append(f"training shards: {storage.join(root, 'shards')}")
    nxt = [f"saferclip-data status {root}"]
    if getattr(pipeline.recipe.source, "kind", None) == "toy":
        nxt.append(f"saferclip-data toy audit {target}".rstrip())
    if "shards" in names:
        nxt += [f"saferclip-data train {target}".rstrip(), f"saferclip-data eval {target}".rstrip()]
    lines.append("next: " + "   ".join(nxt))
    return lines


RecipeArg = Annotated[
    Path | None,
    typer.Argument(
        help="Recipe YAML. Default: the offline demo recipe (toy world + tiny CLIP) that ships with the package.",
        show_default=False,
    ),
]
WorkdirOpt = Annotated[
    str | None,
    typer.Option("--workdir", "-w", help="Work dir, a folder or a bucket URL such as s3://bucket/runs/x (default: the "
                 "recipe's, else ./work/<name>)."),  # fmt: skip
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise UserError(f"--log-level: unknown level '{level}' (use debug, info, warning or error)")
    logging.basicConfig(level=numeric, handlers=[RichHandler(console=console, show_path=False)], force=True)


def _user_error_of(exc: BaseException) -> UserError | None:
    """A UserError, also one raised inside a Ray worker (Ray wraps it and keeps it as ``cause``)."""
    seen = exc
    for _ in range(4):
        if isinstance(seen, UserError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            return None
    return None


@app.command(epilog="Example: saferclip-data build recipes/demo.yaml --executor local")
def build(
    recipe: RecipeArg = None,
    workdir: WorkdirOpt = None,
    executor: Annotated[
        ExecutorKind,
        typer.Option(help="ray: Ray actors (embedded Ray unless --ray-address); local: in-process, same results."),
    ] = ExecutorKind.ray,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray cluster to join, e.g. 127.0.0.1:6379 or auto (default: $RAY_ADDRESS, "
                     "which `ray job submit` sets, else an embedded Ray)."),  # fmt: skip
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    progress_style: Annotated[
        ProgressStyle,
        typer.Option(
            help="bars, lines (a timestamped line per stage and every 15 s), or auto: lines when the "
            "output is not a terminal (CI, a pipe, a log file)."
        ),
    ] = ProgressStyle.auto,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Run every stage of RECIPE that is not up to date; resume unfinished shards after a crash."""
    from saferclip_data.pipeline.executors import make_executor

    _setup_logging(log_level)
    pipeline = open_pipeline(recipe, workdir)
    with WorkDirLock(pipeline.workdir.lock_folder, "saferclip-data build"):  # before Ray starts: a 2nd build stops
        runner = make_executor(executor.value, ray_address)
        try:
            with build_progress(console, progress, progress_style.value) as bars:
                outcomes = pipeline.build(runner, bars)
        finally:
            runner.close()
    console.print(summary_table(outcomes, steps=bars.steps))
    if all(o.status == "up to date" for o in outcomes):
        console.print("everything up to date: nothing ran")
    for line in next_steps(pipeline, recipe, workdir):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command(epilog="Example: saferclip-data validate recipes/demo.yaml")
def validate(recipe: RecipeArg = None, workdir: WorkdirOpt = None, log_level: LogLevelOpt = "warning") -> None:
    """Check RECIPE (keys, types, paths, model) without running anything."""
    _setup_logging(log_level)
    pipeline = open_pipeline(recipe, workdir)
    names = " -> ".join(p.name for p in pipeline.stages)
    typer.echo(f"recipe ok: {pipeline.recipe.name}: {names}; work dir {pipeline.workdir.root}")


@app.command(epilog="Example: saferclip-data plan recipes/demo.yaml")
def plan(recipe: RecipeArg = None, workdir: WorkdirOpt = None, log_level: LogLevelOpt = "warning") -> None:
    """Show the stage graph, each stage's resources and what is already done."""
    _setup_logging(log_level)
    pipeline = open_pipeline(recipe, workdir)
    table = Table(title=f"plan: {pipeline.recipe.name} (work dir {pipeline.workdir.root})")
    rows = pipeline.plan_rows()
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)


@app.command(epilog="Example: saferclip-data status work/demo   (or: saferclip-data status recipes/demo.yaml)")
def status(
    target: Annotated[
        str | None, typer.Argument(help="A work dir (a folder or a URL), or a recipe whose work dir to read.")
    ] = None,
    workdir: WorkdirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Per stage: shards done/pending, records in/out/rejected, rejects by reason."""
    _setup_logging(log_level)
    from saferclip_data.stages import REGISTRY

    wd = work_dir_of(target, workdir, "status")
    rows = stage_status(wd, list(REGISTRY))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        _print_status(wd.location, rows)


def _print_status(root: str, rows: list[dict]) -> None:
    out = Console()
    table = Table(title=f"status: {root}", title_justify="left")
    for column in ("stage", "state", "shards", "in", "out", "rejected", "partial"):
        table.add_column(column, justify="left" if column in ("stage", "state") else "right", no_wrap=True)
    for r in rows:
        shards = f"{r['shards_done']:,}/{r['shards_done'] + r['shards_pending']:,}"
        table.add_row(r["stage"], r["state"], shards, f"{r['in']:,}", f"{r['out']:,}", f"{r['rejected']:,}",
                      f"{r['partial']:,}" if r["partial"] else "-")  # fmt: skip
    out.print(table)
    for title, field in (("rejects by reason:", "rejects_by_reason"),
                         ("kept, but part of their output is missing:", "partial_by_reason")):  # fmt: skip
        reasons = [(r["stage"], k, v) for r in rows for k, v in r[field].items()]
        if reasons:
            out.print(title)
            for stage, reason, count in reasons:
                out.print(f"  {stage:<10} {count:>9,}  {reason}", markup=False, highlight=False)


def _plain_flags_in_help() -> None:
    """Boolean flags need no value, so their help shows no ``<bool>`` type (typer >= 0.26 shows one); a typer
    without the hook is left as it is."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_plain_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._plain_flags = True
    TyperOption.display_type_rich = display_type_rich


_plain_flags_in_help()


def _add_subapps() -> None:
    from saferclip_data.cli.bench import bench_app
    from saferclip_data.cli.compare import compare_command
    from saferclip_data.cli.export import export_app
    from saferclip_data.cli.report import report_command
    from saferclip_data.cli.toy import toy_app
    from saferclip_data.cli.train import eval_command, train_command

    app.add_typer(toy_app, name="toy")
    app.add_typer(bench_app, name="bench")
    app.add_typer(export_app, name="export")
    app.command(name="report", epilog="Example: saferclip-data report work/demo --out audit/")(report_command)
    app.command(name="train", epilog="Example: saferclip-data train recipes/demo.yaml --method safeclip")(train_command)
    app.command(name="eval", epilog="Example: saferclip-data eval recipes/demo.yaml")(eval_command)
    app.command(name="compare", epilog="Example: saferclip-data compare recipes/demo.yaml --seeds 3")(compare_command)


_add_subapps()


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits) of click and of typer, which vendors its own copy of click since 0.20: with
    ``standalone_mode=False`` they reach ``main``, which prints them as click would (one line, exit code 2)."""
    usage: list[type] = []
    done: list[type] = [typer.Exit]
    try:  # a typer that vendors click no longer needs it installed
        import click

        usage.append(click.exceptions.ClickException)
        done.append(click.exceptions.Exit)
    except ImportError:
        pass
    if hasattr(typer, "TyperException"):  # typer >= 0.20: its usage errors derive from it and can show themselves
        usage.append(typer.TyperException)
    return tuple(usage), tuple(done)


#: OS errors that are the machine's state, not a bug: said in one line, with what to do
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some and run the same command again (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded: free some and run the same command again (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose a writable work dir (-w)",
    errno.EACCES: "permission denied: choose a work dir you may write to (-w), or fix its permissions",
    errno.EPERM: "operation not permitted: choose a work dir you may write to (-w), or fix its permissions",
}


def _os_error_of(exc: BaseException) -> OSError | None:
    """An OSError of the kinds above, also one raised inside a Ray worker or a writer thread."""
    seen: BaseException | None = exc
    for _ in range(6):
        if isinstance(seen, OSError) and seen.errno in _OS_ADVICE:
            return seen
        if seen is None:
            return None
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return None


def _say_os_error(error: OSError) -> None:
    """One line naming the file, else the work dir the command was writing (a full disk often names neither)."""
    if error.filename:
        where = f"writing {error.filename}"
    elif opened_workdir:
        where = f"writing in work dir {opened_workdir[0]}"
    else:
        where = "writing"
    console.print(f"error: {where}: {_OS_ADVICE[error.errno]}", markup=False, highlight=False, soft_wrap=True)


def _warn_about_the_install() -> None:
    """One line where the environment is broken in a way the user must fix (two faiss wheels in one folder)."""
    from saferclip_data.stages.knn import faiss_install_problem

    problem = faiss_install_problem()
    if problem:
        console.print(f"warning: {problem}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry: run the app, turning user mistakes into one line and exit code 2."""
    _warn_about_the_install()
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
    except UserError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; unwrap the user's ones
        usage, done = _click_exception_types()
        if isinstance(exc, usage) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, done):
            sys.exit(exc.exit_code)
        user = _user_error_of(exc)
        if user is None:
            os_error = _os_error_of(exc)
            if os_error is None:
                raise
            _say_os_error(os_error)
            sys.exit(2)
        console.print(f"error: {user}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
