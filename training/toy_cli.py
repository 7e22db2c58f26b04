"""`saferclip-data toy ...`: generate the toy safety world and pretrain the tiny CLIP on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

toy_app = typer.Typer(help="The toy safety world: generate it, pretrain a tiny CLIP on it.", no_args_is_help=True)
console = Console(stderr=True)


@toy_app.command(epilog="Example: saferclip-data toy generate --out toy-world --seed 0 --scenes 3000")
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write shards/, manifest.parquet, world.json.")],
    seed: Annotated[int, typer.Option(help="World seed: same seed, byte-identical shards.")] = 0,
    scenes: Annotated[int, typer.Option(min=1, help="Safe scenes over train/val/test (each + unsafe edit).")] = 3000,
    shifted_scenes: Annotated[int, typer.Option(min=0, help="Scenes of the shifted split (held-out places).")] = 400,
    noisy_pair_fraction: Annotated[float, typer.Option(min=0, max=1, help="Share of wrong ViSU-like pairs.")] = 0.4,
    shard_size: Annotated[int, typer.Option(min=1, help="Records per tar shard.")] = 1000,
) -> None:
    """Write the world as an ordinary source (WebDataset shards + parquet manifest) that `build` reads."""
    from saferclip_data.stages.toyworld import WorldConfig, write_world

    config = WorldConfig(
        seed=seed,
        scenes=scenes,
        shifted_scenes=shifted_scenes,
        noisy_pair_fraction=noisy_pair_fraction,
        shard_size=shard_size,
    )
    total = 2 * (scenes + shifted_scenes)
    with Progress(
        TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("generate", total=total)
        summary = write_world(config, out, on_record=lambda: progress.advance(task))
    table = Table(title=f"toy world {summary['fingerprint']} in {out}")
    for column in ("split", "safe", "unsafe"):
        table.add_column(column)
    for split, counts in summary["by_split"].items():
        table.add_row(split, str(counts["safe"]), str(counts["unsafe"]))
    Console().print(table)
    Console().print(f"{len(summary['shards'])} shards in {out / 'shards'}; read them with source kind webdataset")


@toy_app.command(epilog="Example: saferclip-data toy pretrain --arch toy-resnet-tiny --seed 0")
def pretrain(
    arch: Annotated[str, typer.Option(help="A toy architecture (toy-resnet-tiny, toy-vit-tiny).")] = "toy-resnet-tiny",
    seed: Annotated[int, typer.Option(help="Init and data seed.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps (default: the tuned value).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if a cached checkpoint exists.")] = False,
) -> None:
    """Pretrain (or load from the cache) the tiny CLIP and print its zero-shot figures."""
    from saferclip_data.pipeline.errors import UserError
    from saferclip_data.training.models import known_architectures
    from saferclip_data.training.toy_pretrain import PretrainConfig, checkpoint_path, ensure_pretrained

    if not arch.startswith("toy-") or arch not in known_architectures():
        raise UserError(f"--arch: '{arch}' is not a toy architecture (toy-resnet-tiny, toy-vit-tiny)")
    config = PretrainConfig(arch=arch, seed=seed, **({"steps": steps} if steps else {}))
    cached = checkpoint_path(config).is_file() and not force
    with Progress(
        TextColumn("pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        disable=cached,
    ) as progress:
        task = progress.add_task("pretrain", total=config.steps, loss="-")
        path, metrics = ensure_pretrained(
            config,
            force=force,
            on_step=lambda step, loss: progress.update(task, advance=1, loss=f"{loss:.3f}"),
        )
    table = Table(title=f"toy CLIP {arch} (seed {seed}){' - from cache' if cached else ''}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("zero-shot place accuracy", f"{metrics['place_accuracy']:.1%}", ">= 90%")
    table.add_row("zero-shot object accuracy", f"{metrics['object_accuracy']:.1%}", ">= 80%")
    table.add_row("image->text R@1", f"{metrics['image_to_text_r1']:.1%}", ">= 50%")
    for category, value in metrics["unsafe_auroc"].items():
        table.add_row(f"unsafe AUROC: {category}", f"{value:.3f}", ">= 0.9")
    table.add_row("training seconds", f"{metrics['train_seconds']:.0f}", "<= 600")
    Console().print(table)
    Console().print(f"checkpoint: {path}  (recipes: model.arch {arch}, model.pretrained toy-world)")
