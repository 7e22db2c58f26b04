"""`saferclip-data report [WORKDIR | RECIPE] [-w WORKDIR]`: the audit report of a work dir, at any time (also of a
partial build)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError


def report_command(
    target: Annotated[
        str | None, typer.Argument(help="A work dir (e.g. work/demo, or a URL), or a recipe whose work dir to read.")
    ] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="The work dir, if not TARGET's.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write it (default: WORKDIR/report).")
    ] = None,
    show_unsafe: Annotated[
        bool, typer.Option("--show-unsafe", help="Show unsafe thumbnails unblurred (they are blurred by default).")
    ] = False,
    samples: Annotated[int, typer.Option(help="Unsafe records (with their top-1 target) in the sample table.")] = 12,
    modality: Annotated[str, typer.Option(help="Mined modality of the sample table: text, image, ...")] = "text",
) -> None:
    """Write report.html (self-contained, plots embedded), report.md and report.json: counts per source, split and
    category, rejects by stage and reason, score and alignment histograms before and after thresholds, mined
    target similarity, rank, difficulty and reuse (Gini), given pair vs mined target, the benchmark datasheet and
    leakage findings, and a sample table of pairs with thumbnails."""
    from saferclip_data.cli.common import work_dir_of
    from saferclip_data.stages.report import write_report

    wd = work_dir_of(target, workdir, "report")
    if wd.manifest("source") is None:
        raise UserError(f"{wd.location}: not a work dir with a finished source stage (run build first)")
    wd.pull_all()  # a bucket's work dir: read from this command's local mirror of it
    path = write_report(wd.root, out, show_unsafe=show_unsafe, samples=samples, modality=modality)
    if wd.remote and out is None:
        wd.publish("report")
        path = storage.join(wd.location, "report", path.name)
    typer.echo(f"report: {path}  (also report.md, report.json)")
