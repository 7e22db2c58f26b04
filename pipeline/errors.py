"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a recipe, a path or an input that the user can fix; never shown with a traceback."""


class RecipeError(UserError):
    """A recipe that cannot be loaded or validated; the message names the file and the key path."""

    def __init__(self, file: str, key_path: str, problem: str):
        self.file, self.key_path, self.problem = file, key_path, problem
        where = f"{file}: {key_path}: " if key_path else f"{file}: "
        super().__init__(f"{where}{problem}")


class ModelIdentityError(UserError):
    """Embeddings from one model were fed to a stage configured for another."""


def missing_extra(module: str, extra: str) -> str | None:
    """Why a feature cannot run here: its package (``module``) is not installed, with the pip extra that adds it
    (``needs img2dataset: pip install 'saferclip-data[download]'``); None where it is installed."""
    from importlib.util import find_spec

    if find_spec(module) is not None:
        return None
    return f"needs the {module} package: pip install 'saferclip-data[{extra}]'"
