"""`saferclip-data compare`: base vs SaFeR-CLIP vs Safe-CLIP, LoRA and full, over seeds, in one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from saferclip_data.pipeline.errors import UserError


def compare_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
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
    from saferclip_data.cli.train import evaluation_inputs, finished_shards, training_config
    from saferclip_data.pipeline.progress import step_progress
    from saferclip_data.pipeline.workdir import atomic_write_text
    from saferclip_data.training.comparison import run_name, write_comparison
    from saferclip_data.training.trainer import load_checkpoint, train

    if seeds < 1:
        raise UserError(f"--seeds: {seeds} is not a positive number of runs")
    pipeline = open_pipeline(recipe, workdir)
    shard_dir = finished_shards(pipeline)
    methods, modes = method or ["saferclip", "safeclip"], finetune or ["lora", "full"]
    configs = {(m, f, s): training_config(pipeline, {"method": m, "finetune": f, "seed": s, "epochs": epochs})
               for m in methods for f in modes for s in range(seeds)}  # fmt: skip
    out = out or pipeline.workdir.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    inputs = evaluation_inputs(pipeline)
    base_file = out / "base.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base = inputs.figures(inputs.fresh())
        atomic_write_text(base_file, json.dumps(base, indent=2) + "\n")
    results = {}
    for i, (key, config) in enumerate(configs.items(), 1):
        name = run_name(*key)
        run_dir = out / "runs" / name
        figures_file = run_dir / "eval.json"
        if figures_file.is_file():
            typer.echo(f"[{i}/{len(configs)}] {name}: done before ({figures_file})")
            results[key] = json.loads(figures_file.read_text())
            continue
        resumed = " (resuming)" if (run_dir / "last.pt").is_file() else ""
        typer.echo(f"[{i}/{len(configs)}] {name}: training{resumed}")
        with step_progress(name, enabled=progress) as on_step:
            train(inputs.fresh(), shard_dir, run_dir, config, on_step=on_step)
        results[key] = inputs.figures(load_checkpoint(inputs.fresh(), run_dir / "last.pt"))
        atomic_write_text(figures_file, json.dumps(results[key], indent=2) + "\n")
    first = next(iter(configs.values()))
    budget = f"{first.epochs} epochs, batch {first.batch_size}, lr {first.lr:g}, the recipe's loss weights"
    md = write_comparison(out, base, results, seeds, budget)
    typer.echo(md.read_text())
    typer.echo(f"written: {md}, results.json and tradeoff.png")
