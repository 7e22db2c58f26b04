"""`saferclip-data train`: fine-tune the recipe's model on the shards a build wrote (SaFeR-CLIP or Safe-CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saferclip_data.models.clip import CompileMode
from saferclip_data.pipeline.errors import UserError
from saferclip_data.training.recipe_inputs import (
    evaluation_inputs,
    finished_shards,
    recipe_clip,
    train_dir,
    training_config,
)


def train_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    method: Annotated[str | None, typer.Option(help="saferclip or safeclip (the baseline).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs.")] = None,
    finetune: Annotated[str | None, typer.Option(help="Override training.finetune: lora or full.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override training.lr.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override training.seed (data order, init of adapters).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    compile_mode: Annotated[
        CompileMode | None,
        typer.Option("--compile", help="Override training.compile: torch.compile the towers with this mode."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: train/ and the method's name, in the work dir).")
    ] = None,
    ray_workers: Annotated[
        int, typer.Option(help="Train data-parallel on this many Ray Train workers (0: in this process).")
    ] = 0,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster for --ray-workers (default: local).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    log_dir: Annotated[
        Path | None, typer.Option(help="Also log loss terms and learning rate as TensorBoard event files here.")
    ] = None,
    wandb: Annotated[
        str | None, typer.Option(help="Also log them to this Weights & Biases project (offline without a login).")
    ] = None,
) -> None:
    """Stream the build's quadruplet shards into the trainer: the recipe's model is fine-tuned (LoRA on both
    towers, or in full) against a frozen copy of itself with SaFeR-CLIP's losses (or Safe-CLIP's), easy-to-hard
    by difficulty bucket; bf16 autocast on CUDA. Writes last.pt (adapters, optimiser, scheduler, data position:
    rerunning resumes), log.jsonl (loss terms per step) and, when finished, model.pt (a plain open_clip state
    dict). Multi-GPU: run it under `torchrun --nproc_per_node N`, or on a Ray cluster with --ray-workers N."""
    from saferclip_data.cli.common import open_pipeline
    from saferclip_data.pipeline.progress import step_progress
    from saferclip_data.training.trainer import train

    pipeline = open_pipeline(recipe, workdir)
    shard_dir = finished_shards(pipeline)
    config = training_config(pipeline, {"method": method, "epochs": epochs, "finetune": finetune, "lr": lr,
                                        "seed": seed, "compile": compile_mode, "wandb": wandb,
                                        "log_dir": str(log_dir.resolve()) if log_dir else None})  # fmt: skip
    if ray_workers < 0:
        raise UserError(f"--ray-workers: {ray_workers} is negative")
    clip = None if ray_workers else recipe_clip(pipeline.recipe.model)
    out_dir = out or train_dir(pipeline, config.method)
    try:
        if ray_workers:
            from saferclip_data.training.ray_train import train_on_ray

            model = pipeline.recipe.model
            source = {"arch": model.arch, "pretrained": model.pretrained, "init_seed": model.init_seed,
                      "cache_dir": model.cache_dir}  # fmt: skip
            result = train_on_ray(source, shard_dir, out_dir, config, ray_workers,
                                  address=ray_address, stop_after=max_steps)  # fmt: skip
        else:
            with step_progress(f"train {config.method}", enabled=progress) as on_step:
                result = train(clip, shard_dir, out_dir, config, stop_after=max_steps,
                               on_step=on_step)  # fmt: skip
    except ValueError as exc:  # a checkpoint from another model or adapter, a bad loss-weight name
        raise UserError(f"train: {exc}") from None
    pipeline.workdir.publish("train")  # a bucket's work dir: the checkpoint and log uploaded
    if result["stopped"]:
        typer.echo(f"{config.method}: stopped at --max-steps after {result['step']} steps; "
                   f"rerun to resume from {out_dir / 'last.pt'}")  # fmt: skip
    else:
        typer.echo(f"{config.method}: finished after {result['step']} steps; model {out_dir / 'model.pt'}")


def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="Trainer checkpoints to compare (default: WORKDIR/train/*/last.pt).")
    ] = None,
    zero_shot: Annotated[
        list[Path] | None,
        typer.Option(help="Image-folder set (a sub-folder per class) for zero-shot accuracy; repeatable."),
    ] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Also log the figures as TensorBoard event files here.")] = None,
    wandb: Annotated[str | None, typer.Option(help="Also log them to this Weights & Biases project.")] = None,
) -> None:
    """Compare the recipe's base model with fine-tuned checkpoints on the build's benchmark: R@1/5/10 for T->V,
    V->T, T*->V, V*->T on safe-only and safe+unsafe galleries, Safe-CLIP's protocol (eight text/image pairings,
    R@1/5/10/20), zero-shot accuracy (toy models), weight and embedding drift, and a Table-1-style summary line per
    model. Writes WORKDIR/eval/eval.md and eval.json and prints the tables."""
    from saferclip_data.cli.common import open_pipeline
    from saferclip_data.training.evaluate import write_results
    from saferclip_data.training.tracking import log_figures
    from saferclip_data.training.trainer import load_checkpoint

    pipeline = open_pipeline(recipe, workdir)
    wd = pipeline.workdir
    if not checkpoint:
        wd.pull("train", "*/last.pt")  # a bucket's work dir: the checkpoints copied to this node's mirror
    checkpoints = checkpoint or sorted(wd.root.glob("train/*/last.pt"))
    for path in checkpoints:
        if not path.is_file():
            raise UserError(f"--checkpoint: no file {path}")
    inputs = evaluation_inputs(pipeline, zero_shot)
    results = {"base": inputs.figures(inputs.fresh())}
    for path in checkpoints:
        try:
            results[path.parent.name] = inputs.figures(load_checkpoint(inputs.fresh(), path))
        except ValueError as exc:
            raise UserError(f"--checkpoint {path}: {exc}") from None
    md = write_results(results, wd.root / "eval")
    log_figures(results, log_dir, wandb, wd.root / "eval" / "wandb")
    wd.publish("eval")
    typer.echo(md.read_text())
    typer.echo(f"written: {md} and eval.json")
