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
