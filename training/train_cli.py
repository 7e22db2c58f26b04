"""`saferclip-data train`: fine-tune the recipe's model on the shards a build wrote (SaFeR-CLIP or Safe-CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.training.models import CompileMode


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
    decode: Literal["auto", "cpu", "device"] = Field(
        default="auto",
        description="where training images are decoded: cpu (PIL in the DataLoader workers), device (batched "
        "nvJPEG + resize on the GPU), auto = device on CUDA where the model's preprocessing allows",
    )
    log_every: int = Field(
        default=10, gt=0, description="optimiser steps between log.jsonl writes (reading a loss waits for the GPU)"
    )
    schedule: list[list[Literal["easy", "medium", "hard"]]] = Field(
        default_factory=lambda: [["easy"], ["easy", "medium"], ["easy", "medium", "hard"]],
        min_length=1,
        description="difficulty buckets admitted per epoch; the last entry holds for later epochs",
    )
    weights: dict[str, float] = Field(default_factory=dict, description="SaFeR-CLIP loss weights by term name")
    finetune: Literal["lora", "full"] = Field(default="lora", description="LoRA adapters (the paper) or all weights")
    towers: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], min_length=1)
    lora_rank: int = Field(default=16, gt=0)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 autocast on CUDA")
    reference_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="weights of the frozen reference (T0, V0): auto = bf16 when the step runs in bf16 (it is never "
        "trained, and bf16 weights run faster than autocast over fp32 ones), fp32 = as the trained model",
    )
    compile: CompileMode | None = Field(
        default=None,
        description="torch.compile the towers of the frozen reference and of the trained model with this mode "
        "(fuses the layer norms, activations and casts around the matmuls; compiling takes the first steps, "
        "minutes for ViT-L/14); towers with LoRA attention layers stay eager; unset = eager",
    )
    split: Literal["auto", "samples", "tars"] = Field(
        default="auto",
        description="how DDP ranks share an epoch: samples = every rank reads every tar and keeps every N-th "
        "sample (all samples, any number of tars); tars = each rank reads only its own tars, so reading scales "
        "with the ranks (needs a tar per rank, and ranks train on as many samples as the one whose tars hold the "
        "fewest); auto = tars wherever there are more tars than ranks, else samples",
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader processes decoding images; auto = one per CPU core up to 8 (one spared) on CUDA, "
        "none on a CPU, where they would take cores from the step",
    )


class ZeroShotSet(BaseModel):
    """An image-folder data set (one sub-folder per class) for zero-shot accuracy in ``eval``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)


class EvaluationSection(BaseModel):
    """The recipe's optional top-level ``evaluation:`` section."""

    model_config = ConfigDict(extra="forbid")
    heldout_splits: list[str] | None = Field(
        default=None, description="splits to evaluate as a second retrieval table (default: shards.exclude_splits)"
    )
    zero_shot: list[ZeroShotSet] = Field(default_factory=list)


def train_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
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
) -> None:
    """Stream the build's quadruplet shards into the trainer: the recipe's model is fine-tuned (LoRA on both
    towers, or in full) against a frozen copy of itself with SaFeR-CLIP's losses (or Safe-CLIP's), easy-to-hard
    by difficulty bucket; bf16 autocast on CUDA. Writes last.pt (adapters, optimiser, scheduler, data position:
    rerunning resumes), log.jsonl (loss terms per step) and, when finished, model.pt (a plain open_clip state
    dict). Multi-GPU: run it under `torchrun --nproc_per_node N`, or on a Ray cluster with --ray-workers N."""
    from saferclip_data.pipeline.cli import _pipeline
    from saferclip_data.pipeline.progress import step_progress
    from saferclip_data.training.models import load_clip
    from saferclip_data.training.trainer import TrainConfig, train

    pipeline = _pipeline(recipe, workdir)
    wd = pipeline.workdir
    shard_dir = wd.stage_dir("shards") / "quad"
    if not (wd.manifest("shards") or {}).get("complete") or not shard_dir.is_dir():
        raise UserError(f"{wd.root}: no finished shards stage; add stages.shards to the recipe and run build first")
    section: TrainingSection = getattr(pipeline.recipe, "training", None) or TrainingSection()
    settings = section.model_dump()
    overrides = {"method": method, "epochs": epochs, "finetune": finetune, "lr": lr, "seed": seed,
                 "compile": compile_mode}  # fmt: skip
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["method"] not in ("saferclip", "safeclip"):
        raise UserError(f"--method: '{settings['method']}' is not saferclip or safeclip")
    if settings["finetune"] not in ("lora", "full"):
        raise UserError(f"--finetune: '{settings['finetune']}' is not lora or full")
    model = pipeline.recipe.model
    if ray_workers < 0:
        raise UserError(f"--ray-workers: {ray_workers} is negative")
    if not ray_workers:
        clip = load_clip(model.arch, model.pretrained, init_seed=model.init_seed, cache_dir=model.cache_dir)
    out_dir = out or wd.root / "train" / settings["method"]
    try:
        if ray_workers:
            from saferclip_data.training.ray_train import train_on_ray

            source = {"arch": model.arch, "pretrained": model.pretrained, "init_seed": model.init_seed,
                      "cache_dir": model.cache_dir}  # fmt: skip
            result = train_on_ray(source, shard_dir, out_dir, TrainConfig(**settings), ray_workers,
                                  address=ray_address, stop_after=max_steps)  # fmt: skip
        else:
            with step_progress(f"train {settings['method']}", enabled=progress) as on_step:
                result = train(clip, shard_dir, out_dir, TrainConfig(**settings), stop_after=max_steps,
                               on_step=on_step)  # fmt: skip
    except ValueError as exc:  # a checkpoint from another model or adapter, a bad loss-weight name
        raise UserError(f"train: {exc}") from None
    if result["stopped"]:
        typer.echo(f"{settings['method']}: stopped at --max-steps after {result['step']} steps; "
                   f"rerun to resume from {out_dir / 'last.pt'}")  # fmt: skip
    else:
        typer.echo(f"{settings['method']}: finished after {result['step']} steps; model {out_dir / 'model.pt'}")


def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="Trainer checkpoints to compare (default: WORKDIR/train/*/last.pt).")
    ] = None,
    zero_shot: Annotated[
        list[Path] | None,
        typer.Option(help="Image-folder set (a sub-folder per class) for zero-shot accuracy; repeatable."),
    ] = None,
) -> None:
    """Compare the recipe's base model with fine-tuned checkpoints on the build's benchmark: R@1/5/10 for T->V,
    V->T, T*->V, V*->T on safe-only and safe+unsafe galleries, zero-shot accuracy (toy models), weight and
    embedding drift. Writes WORKDIR/eval/eval.md and eval.json and prints the table."""
    from saferclip_data.pipeline.cli import _pipeline
    from saferclip_data.stages.benchmark_export import source_rows
    from saferclip_data.training.evaluate import benchmark_rows, embed_benchmark, evaluate, heldout_rows, write_results
    from saferclip_data.training.models import load_clip
    from saferclip_data.training.trainer import load_checkpoint

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

    section: EvaluationSection = getattr(pipeline.recipe, "evaluation", None) or EvaluationSection()
    sets = {z.name: (Path(z.path), z.templates) for z in section.zero_shot}
    sets.update({p.name: (p, ["a photo of a {}."]) for p in zero_shot or []})
    for name, (folder, _) in sets.items():
        if not folder.is_dir():
            raise UserError(f"zero-shot set '{name}': no folder {folder}")
    splits = section.heldout_splits
    if splits is None:
        shards = pipeline.recipe.stages.shards
        splits = list(shards.exclude_splits) if shards else []
    rows = benchmark_rows(bench)
    heldout = heldout_rows(wd, splits) if splits else []
    keys = {r[k] for r in rows + heldout for k in ("safe_key", "unsafe_key")}
    images = {k: r["image"] for k, r in source_rows(wd, keys).items() if r["image"]}
    heldout = [r for r in heldout if r["safe_key"] in images and r["unsafe_key"] in images]
    original = fresh()
    base = embed_benchmark(original, rows, images)
    toy = model.arch.startswith("toy-")

    def figures(clip):
        return evaluate(clip, original, rows, images, base, toy, heldout, sets)

    results = {"base": figures(fresh())}
    for path in checkpoints:
        try:
            results[path.parent.name] = figures(load_checkpoint(fresh(), path))
        except ValueError as exc:
            raise UserError(f"--checkpoint {path}: {exc}") from None
    md = write_results(results, wd.root / "eval")
    typer.echo(md.read_text())
    typer.echo(f"written: {md} and eval.json")
