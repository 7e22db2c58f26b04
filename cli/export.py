"""`saferclip-data export hf`: the benchmark as a Hugging Face dataset folder (and, with --push, on the hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(help="Export a build's outputs in other tools' layouts.", no_args_is_help=True)


@export_app.command(epilog="Example: saferclip-data export hf work/demo --out nsfwcaps-demo --push me/nsfwcaps-demo")
def hf(
    target: Annotated[
        str | None, typer.Argument(help="A work dir with a finished benchmark stage, or a recipe whose work dir.")
    ] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="The work dir, if not TARGET's.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The dataset folder to write.")] = Path("hf-benchmark"),
    license_id: Annotated[str, typer.Option("--license", help="License id for the dataset card.")] = "other",
    push: Annotated[
        str | None, typer.Option(help="Also upload it as this hub dataset repository (org/name; needs a token).")
    ] = None,
    public: Annotated[bool, typer.Option(help="With --push: a public repository (default: private).")] = False,
) -> None:
    """Write the benchmark's quadruplets as Parquet with Image features plus a dataset card (README.md with YAML
    front matter: configs, features, license, the datasheet's hashes, how it was built), the folder that
    `datasets.load_dataset(OUT)` reads."""
    from saferclip_data.cli.common import work_dir_of
    from saferclip_data.stages.benchmark_hf import push as push_folder
    from saferclip_data.stages.benchmark_hf import write_hf_dataset

    wd = work_dir_of(target, workdir, "export hf")
    wd.pull_all()  # a bucket's work dir: read from this command's local mirror of it
    written = write_hf_dataset(wd, out, license_id)
    typer.echo(f"hf dataset: {out} ({written['rows']} quadruplets in {len(written['files'])} parquet file(s))")
    if push:
        typer.echo(f"pushed: {push_folder(out, push, private=not public)}")
