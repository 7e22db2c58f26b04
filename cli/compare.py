"""`saferclip-data compare`: base vs SaFeR-CLIP vs Safe-CLIP, LoRA and full, over seeds, in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saferclip_data.pipeline.errors import UserError


def compare_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    seeds: Annotated[int, typer.Option(help="Runs per method and fine-tuning mode (seeds 0 .. N-1).")] = 3,
    method: Annotated[
        list[str] | None, typer.Option(metavar="METHOD", help="saferclip or safeclip (repeatable). Default: both.")
    ] = None,
    finetune: Annotated[
        list[str] | None, typer.Option(metavar="MODE", help="lora or full (repeatable). Default: both.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs for every run (same budget).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: WORKDIR/compare).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar per run.")] = True,
) -> None:
    """Train every method x fine-tuning mode x seed with the recipe's training settings (one budget for all),
    evaluate each run like `eval`, and write OUT/results.md and results.json (mean ± sd per method and mode) and
    OUT/tradeoff.png (zero-shot accuracy kept against unsafe->safe R@1, one point per run). Resumable: a run
    with its eval.json is not redone, an interrupted one continues from its last checkpoint."""
    from saferclip_data.cli.common import open_pipeline
    from saferclip_data.training.comparison import run_comparison

    if seeds < 1:
        raise UserError(f"--seeds: {seeds} is not a positive number of runs")
    pipeline = open_pipeline(recipe, workdir)
    if out is None:
        pipeline.workdir.pull("compare")  # a bucket's work dir: the runs an earlier call finished
    md = run_comparison(pipeline, method or ["saferclip", "safeclip"], finetune or ["lora", "full"], seeds, epochs,
                        out or pipeline.workdir.root / "compare", progress, typer.echo)  # fmt: skip
    if out is None:
        pipeline.workdir.publish("compare")
    typer.echo(md.read_text())
    typer.echo(f"written: {md}, results.json and tradeoff.png")
