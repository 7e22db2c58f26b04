"""`saferclip-data train`: fine-tune the recipe's model on the shards a build wrote (SaFeR-CLIP or Safe-CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from saferclip_data.pipeline.errors import UserError


class TrainingSection(BaseModel):
    """The recipe's optional top-level ``training:`` section (the command's options override it)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["saferclip", "safeclip"] = "saferclip"
    epochs: int = Field(default=3, gt=0, description="epochs; the progressive schedule reaches 'all' at epoch 3")
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_accum: int = Field(default=1, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=50, gt=0, description="optimiser steps between checkpoints")
    schedule: list[list[Literal["easy", "medium", "hard"]]] = Field(
        default_factory=lambda: [["easy"], ["easy", "medium"], ["easy", "medium", "hard"]],
        min_length=1,
        description="difficulty buckets admitted per epoch; the last entry holds for later epochs",
    )
    weights: dict[str, float] = Field(default_factory=dict, description="SaFeR-CLIP loss weights by term name")


def train_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    method: Annotated[str | None, typer.Option(help="saferclip or safeclip (the baseline).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: WORKDIR/train/METHOD).")] = None,
) -> None:
    """Stream the build's quadruplet shards into the trainer: the recipe's model is fine-tuned against a frozen
    copy of itself with SaFeR-CLIP's losses (or Safe-CLIP's), easy-to-hard by difficulty bucket. Writes
    last.pt (model, optimiser, scheduler, data position: rerunning resumes) and log.jsonl (loss terms per step)."""
    from saferclip_data.pipeline.cli import _pipeline
    from saferclip_data.training.models import load_clip
    from saferclip_data.training.trainer import TrainConfig, train

    pipeline = _pipeline(recipe, workdir)
    wd = pipeline.workdir
    shard_dir = wd.stage_dir("shards") / "quad"
    if not (wd.manifest("shards") or {}).get("complete") or not shard_dir.is_dir():
        raise UserError(f"{wd.root}: no finished shards stage; add stages.shards to the recipe and run build first")
    section: TrainingSection = getattr(pipeline.recipe, "training", None) or TrainingSection()
    settings = section.model_dump()
    settings.update({k: v for k, v in {"method": method, "epochs": epochs}.items() if v is not None})
    if settings["method"] not in ("saferclip", "safeclip"):
        raise UserError(f"--method: '{settings['method']}' is not saferclip or safeclip")
    model = pipeline.recipe.model
    clip = load_clip(model.arch, model.pretrained, init_seed=model.init_seed, cache_dir=model.cache_dir)
    out_dir = out or wd.root / "train" / settings["method"]
    result = train(clip, shard_dir, out_dir, TrainConfig(**settings), stop_after=max_steps)
    state = "stopped at --max-steps" if result["stopped"] else "finished"
    typer.echo(f"{settings['method']}: {state} after {result['step']} steps; checkpoint {out_dir / 'last.pt'}")


def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="Trainer checkpoints to compare (default: WORKDIR/train/*/last.pt).")
    ] = None,
) -> None:
    """Compare the recipe's base model with fine-tuned checkpoints on the build's benchmark: R@1/5/10 for T->V,
    V->T, T*->V, V*->T on safe-only and safe+unsafe galleries, zero-shot accuracy (toy models), weight and
    embedding drift. Writes WORKDIR/eval/eval.md and eval.json and prints the table."""
    from saferclip_data.pipeline.cli import _pipeline
    from saferclip_data.stages.benchmark_export import source_rows
    from saferclip_data.training.evaluate import (
        benchmark_rows,
        checkpoint_into,
        embed_benchmark,
        evaluate,
        write_results,
    )
    from saferclip_data.training.models import load_clip

    pipeline = _pipeline(recipe, workdir)
    wd = pipeline.workdir
    bench = wd.stage_dir("benchmark")
    if not (wd.manifest("benchmark") or {}).get("complete"):
        raise UserError(f"{wd.root}: no finished benchmark stage; add stages.benchmark to the recipe and build")
    checkpoints = checkpoint or sorted(wd.root.glob("train/*/last.pt"))
    for path in checkpoints:
        if not path.is_file():
            raise UserError(f"--checkpoint: no file {path}")
    model = pipeline.recipe.model

    def fresh():
        return load_clip(model.arch, model.pretrained, init_seed=model.init_seed, cache_dir=model.cache_dir)

    rows = benchmark_rows(bench)
    keys = {r["safe_key"] for r in rows} | {r["unsafe_key"] for r in rows}
    images = {k: r["image"] for k, r in source_rows(wd, keys).items()}
    original = fresh()
    base = embed_benchmark(original, rows, images)
    toy = model.arch.startswith("toy-")
    results = {"base": evaluate(fresh(), original, rows, images, base, toy)}
    for path in checkpoints:
        results[path.parent.name] = evaluate(checkpoint_into(fresh(), path), original, rows, images, base, toy)
    md = write_results(results, wd.root / "eval")
    typer.echo(md.read_text())
    typer.echo(f"written: {md} and eval.json")
