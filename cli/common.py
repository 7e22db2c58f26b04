"""What every command shares: the recipe sections, the default recipe, and opening a recipe's pipeline."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.recipe import load_recipe
from saferclip_data.pipeline.runner import Pipeline
from saferclip_data.pipeline.workdir import WorkDir

DEFAULT_RECIPE = "demo.yaml"
#: the work dir of the pipeline this command opened: an OS error that names no file is said of it
opened_workdir: list[Path] = []


def recipe_sections() -> dict[str, tuple[type, bool]]:
    """The recipe's top-level sections besides ``stages``: name -> (settings type, required)."""
    from saferclip_data.stages.embed import ModelConfig
    from saferclip_data.stages.source_config import SourceConfig
    from saferclip_data.training.config import EvaluationConfig, TrainConfig

    return {
        "source": (SourceConfig, True),
        "model": (ModelConfig, True),
        "training": (TrainConfig, False),
        "evaluation": (EvaluationConfig, False),
    }


def default_recipe() -> Path:
    """The offline demo recipe that ships with the package."""
    return Path(str(resources.files("saferclip_data.recipes") / DEFAULT_RECIPE))


def open_pipeline(recipe_path: Path | None, workdir: Path | None) -> Pipeline:
    """The recipe (default: the demo) validated and planned over its work dir: ``-w``, else the recipe's
    ``workdir`` (relative to the recipe's folder), else ./work/<name>."""
    from saferclip_data.stages import REGISTRY

    path = recipe_path or default_recipe()
    recipe = load_recipe(path, recipe_sections(), REGISTRY)
    if workdir is not None:
        root = workdir
    elif recipe.workdir:
        root = Path(recipe.workdir).expanduser()
        root = root if root.is_absolute() else path.parent / root
    else:
        root = Path("work") / recipe.name
    if root.exists() and not root.is_dir():
        raise UserError(f"{path}: workdir: {root} is a file, not a folder: choose another work dir (or -w)")
    opened_workdir[:] = [root]
    try:
        return Pipeline(recipe, REGISTRY, WorkDir(root))
    except UserError as exc:  # a stage needing one the recipe does not enable: name the recipe file
        raise UserError(f"{path}: {exc}") from None


def work_dir_of(target: Path | None, workdir: Path | None, command: str) -> Path:
    """The work dir a reading command (``status``, ``report``) reads: ``-w``, else TARGET itself when it is a work
    dir, else the work dir of TARGET as a recipe (default: the demo's); one-line errors."""
    from saferclip_data.stages import REGISTRY

    if workdir is not None:
        root = workdir
    elif target is not None and not target.exists():
        raise UserError(f"{command}: no work dir or recipe at {target}")
    elif target is not None and target.is_dir():
        root = target
    else:
        root = open_pipeline(target, workdir).workdir.root
    if not root.is_dir():
        raise UserError(f"{command}: no work dir at {root}: run build first")
    if not any((root / name / "_manifest.json").is_file() for name in REGISTRY):
        raise UserError(f"{command}: {root} is not a work dir (no stage has run there); give a work dir or a recipe")
    return root
