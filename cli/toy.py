"""`saferclip-data toy ...`: generate the toy safety world and pretrain the tiny CLIP on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

toy_app = typer.Typer(
    help="The toy safety world: generate it, pretrain a tiny CLIP on it, audit a build against its ground truth.",
    no_args_is_help=True,
)
console = Console(stderr=True)


@toy_app.command(epilog="Example: saferclip-data toy generate --out toy-world --seed 0 --scenes 3000")
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write shards/, manifest.parquet, world.json.")],
    seed: Annotated[int, typer.Option(help="World seed: same seed, byte-identical shards.")] = 0,
    scenes: Annotated[int, typer.Option(min=1, help="Safe scenes over train/val/test (each + unsafe edit).")] = 3000,
    shifted_scenes: Annotated[int, typer.Option(min=0, help="Scenes of the shifted split (the benchmark's).")] = 400,
    shift: Annotated[
        str, typer.Option(help="combinations: objects at places training never shows them at; places: unseen places.")
    ] = "combinations",
    noisy_pair_fraction: Annotated[
        float, typer.Option("--noisy-pairs", min=0, max=1, help="Share of wrong ViSU-like pairs.")
    ] = 0.4,
    shard_size: Annotated[int, typer.Option(min=1, help="Records per tar shard.")] = 1000,
) -> None:
    """Write the world as an ordinary source (WebDataset shards + parquet manifest) that `build` reads."""
    from saferclip_data.pipeline.errors import UserError
    from saferclip_data.toyworld import WorldConfig, write_world

    if shift not in ("combinations", "places"):
        raise UserError(f"--shift: '{shift}' is not combinations or places")

    config = WorldConfig(
        seed=seed,
        scenes=scenes,
        shifted_scenes=shifted_scenes,
        shift=shift,
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
    from saferclip_data.models.clip import known_architectures
    from saferclip_data.pipeline.errors import UserError
    from saferclip_data.toyworld.pretrain import PretrainConfig, checkpoint_path, ensure_pretrained

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
    for modality, value in metrics["nearest_safe_precision"].items():
        table.add_row(f"nearest safe {modality} has the same content", f"{value:.1%}", "-")
    table.add_row("training seconds", f"{metrics['train_seconds']:.0f}", "<= 600")
    Console().print(table)
    Console().print(f"checkpoint: {path}  (recipes: model.arch {arch}, model.pretrained toy-world)")


@toy_app.command(epilog="Example: saferclip-data toy audit recipes/demo.yaml")
def audit(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe that was built (default: the demo).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="Its work dir, if not the recipe's.")] = None,
    modality: Annotated[
        str, typer.Option(help="Mined modality to check: text, image, text-image, image-text.")
    ] = "text",
) -> None:
    """Check a finished toy-world build against the world's ground truth: scoring AUROC per category, mining
    precision@1 (the mined top-1 is the scene the unsafe record was edited from, or one with the same content)
    and how often the mined target beats a deliberately wrong given pair."""
    from saferclip_data.cli.common import open_pipeline
    from saferclip_data.pipeline.errors import UserError
    from saferclip_data.toyworld.audit import mining_figures, scoring_auroc

    wd = open_pipeline(recipe, workdir).workdir
    wd.pull_all()  # a bucket's work dir: read from this command's local mirror of it
    for stage in ("source", "score", "neighbours", "mine"):
        if not (wd.manifest(stage) or {}).get("complete"):
            raise UserError(
                f"{wd.root}: stage '{stage}' has not finished; build a toy-world recipe with score, filter, dedup, "
                "neighbours and mine first (e.g. recipes/demo.yaml)"
            )
    table = Table(title="scoring: AUROC of each category's score, its unsafe records vs all safe ones")
    for column in ("category", "unsafe records", "image AUROC", "text AUROC"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for row in scoring_auroc(wd):
        table.add_row(
            row["category"], str(row["unsafe_records"]), f"{row['image_auroc']:.3f}", f"{row['text_auroc']:.3f}"
        )
    Console().print(table)
    figures = mining_figures(wd, modality)
    Console().print(
        f"mining ({figures['modality']}): precision@1 {figures['precision_at_1']:.1%} over {figures['queries']:,} "
        f"unsafe records whose source scene is in the safe pool ({figures['source_not_in_pool']:,} others: source "
        f"filtered, deduplicated or in an excluded split; {figures['removed_before_mining']:,} removed before "
        f"mining; {figures['without_targets']:,} without a target); mined target beats the noisy given pair in "
        f"{figures['mined_beats_noisy_pair']:.1%} of {figures['noisy_pairs']:,} noisy pairs"
    )
