"""What every command shares: the recipe sections, the default recipe, and opening a recipe's pipeline."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.recipe import load_recipe
from saferclip_data.pipeline.runner import Pipeline
from saferclip_data.pipeline.workdir import WorkDir

DEFAULT_RECIPE = "demo.yaml"
#: the work dir of the pipeline this command opened: an OS error that names no file is said of it
opened_workdir: list[str] = []


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


def open_pipeline(recipe_path: Path | None, workdir: str | Path | None) -> Pipeline:
    """The recipe (default: the demo) validated and planned over its work dir: ``-w``, else the recipe's
    ``workdir`` (relative to the recipe's folder), else ./work/<name>. A work dir may be a URL (``s3://...``)."""
    from saferclip_data.stages import REGISTRY

    path = recipe_path or default_recipe()
    recipe = load_recipe(path, recipe_sections(), REGISTRY)
    root: str | Path
    if workdir is not None:
        root = str(workdir) if storage.is_url(workdir) else Path(workdir)
    elif recipe.workdir and storage.is_url(recipe.workdir):
        root = recipe.workdir
    elif recipe.workdir:
        root = Path(recipe.workdir).expanduser()
        root = root if root.is_absolute() else path.parent / root
    else:
        root = Path("work") / recipe.name
    if isinstance(root, Path) and root.exists() and not root.is_dir():
        raise UserError(f"{path}: workdir: {root} is a file, not a folder: choose another work dir (or -w)")
    opened_workdir[:] = [str(root)]
    try:
        return Pipeline(recipe, REGISTRY, WorkDir(root))
    except UserError as exc:  # a stage needing one the recipe does not enable: name the recipe file
        raise UserError(f"{path}: {exc}") from None


def work_dir_of(target: str | None, workdir: str | None, command: str) -> WorkDir:
    """The work dir a reading command (``status``, ``report``) reads: ``-w``, else TARGET itself when it is a work
    dir (a folder or a URL), else the work dir of TARGET as a recipe (default: the demo's); one-line errors."""
    from saferclip_data.stages import REGISTRY

    if workdir is not None:
        wd = WorkDir(workdir if storage.is_url(workdir) else Path(workdir))
    elif target is not None and storage.is_url(target):
        wd = WorkDir(target)
    elif target is not None and not Path(target).exists():
        raise UserError(f"{command}: no work dir or recipe at {target}")
    elif target is not None and Path(target).is_dir():
        wd = WorkDir(Path(target))
    else:
        wd = open_pipeline(Path(target) if target else None, None).workdir
    if not wd.remote and not wd.root.is_dir():
        raise UserError(f"{command}: no work dir at {wd.location}: run build first")
    if not any(wd.manifest(name) is not None for name in REGISTRY):
        raise UserError(f"{command}: {wd.location} is not a work dir (no stage has run there); give a work dir or "
                        "a recipe")  # fmt: skip
    return wd
