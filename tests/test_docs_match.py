"""The docs and --help match the code: every recipe key is in docs/recipes.md, and every command that reads a
work dir takes -w."""

from __future__ import annotations

import re
import types
import typing

import pytest
import yaml
from pydantic import BaseModel

from saferclip_data.pipeline.stage import StageConfig

from conftest import REPO

#: commands that take a recipe but deliberately no -w, and why
NO_WORKDIR_OPTION = {"bench kills": "builds the recipe into a fresh temporary work dir per trial"}


def _models(model: type[BaseModel], prefix: str, seen: set) -> typing.Iterator[tuple[str, str]]:
    """(dotted key, field name) of every field of ``model`` and of the models its fields hold."""
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        yield f"{prefix}.{name}" if prefix else name, name
        for inner in _nested(field.annotation):
            yield from _models(inner, f"{prefix}.{name}" if prefix else name, seen)


def _nested(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        return [m for arg in typing.get_args(annotation) for m in _nested(arg)]
    return []


def recipe_keys() -> list[tuple[str, str]]:
    """Every key a recipe may hold, from the recipe models the commands validate with."""
    from saferclip_data.cli.common import recipe_sections
    from saferclip_data.pipeline.recipe import RecipeHeader
    from saferclip_data.stages import REGISTRY

    keys = list(_models(RecipeHeader, "", set()))
    for section, (model, _) in recipe_sections().items():
        keys += list(_models(model, section, set()))
    for name, stage in REGISTRY.items():
        if getattr(stage, "config_section", None) is None:
            keys += list(_models(stage.Config, f"stages.{name}", set()))
    return keys


def reference(text: str) -> dict:
    """The recipe reference: the YAML block(s) of docs/recipes.md, parsed (they must stay valid YAML)."""
    merged: dict = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        merged.update(yaml.safe_load(block) or {})
    return merged


def missing_from(text: str, keys: list[tuple[str, str]]) -> list[str]:
    """Dotted keys the reference does not hold at their place (a list holds its items' keys)."""
    doc = reference(text)

    def present(dotted: str) -> bool:
        node = doc
        for part in dotted.split("."):
            while isinstance(node, list) and node:
                node = node[0]
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def documented(dotted: str) -> bool:
        # the resources every stage takes (batch_size, concurrency, cpus, gpus) are documented once, under embed
        parent, _, name = dotted.rpartition(".")
        shared = name in StageConfig.model_fields and (parent.startswith("stages.") or parent == "source")
        return present(dotted) or (shared and present(f"stages.embed.{name}"))

    return sorted(dotted for dotted, _ in keys if not documented(dotted))


def test_every_recipe_key_is_in_the_recipe_reference():
    text = (REPO / "docs" / "recipes.md").read_text()
    keys = recipe_keys()
    assert len(keys) > 150  # the walk reaches every section, stage and nested model
    assert not missing_from(text, keys), missing_from(text, keys)


def test_the_key_check_fails_when_a_key_is_removed():
    text = (REPO / "docs" / "recipes.md").read_text()
    without = re.sub(r"(?m)^(    backend:.*\n)", "", text, count=1)
    assert len(missing_from(without, recipe_keys())) == 1


def _commands():
    import typer

    from saferclip_data.cli.main import app

    def walk(command, prefix=""):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, f"{prefix} {name}".strip())
        else:
            yield prefix, command

    return list(walk(typer.main.get_command(app)))


def reads_work_dir_without_w(commands) -> list[str]:
    """Commands that take a recipe or a work dir (they read its work dir) but have no ``-w/--workdir``."""
    missing = []
    for name, command in commands:
        names = {p.name for p in command.params}
        options = {opt for p in command.params for opt in p.opts}
        if names & {"recipe", "target"} and not {"-w", "--workdir"} <= options and name not in NO_WORKDIR_OPTION:
            missing.append(name)
    return missing


def test_every_command_that_reads_a_work_dir_takes_w():
    commands = _commands()
    assert {"build", "status", "report", "train", "eval", "compare", "toy audit"} <= {n for n, _ in commands}
    assert not reads_work_dir_without_w(commands)


def test_the_w_check_fails_when_an_option_is_removed():
    commands = _commands()
    report = next(c for n, c in commands if n == "report")
    kept = report.params
    try:
        report.params = [p for p in kept if p.name != "workdir"]
        assert reads_work_dir_without_w(commands) == ["report"]
    finally:
        report.params = kept


@pytest.mark.parametrize("command", ["status", "report"])
def test_a_reading_command_takes_a_work_dir_as_w(cli, tmp_path, command):
    code, _, err = cli(command, "-w", str(tmp_path / "nothing"))
    assert code == 2 and f"no work dir at {tmp_path / 'nothing'}" in err


def test_relative_paths_in_a_recipe_resolve_against_its_folder(tmp_path, monkeypatch):
    """As recipes/README.md says: model.cache_dir, source.caption_edit.cache_dir and evaluation.zero_shot[].path
    too, whatever the current directory."""
    from saferclip_data.cli.common import open_pipeline

    from conftest import write_recipe
    from helpers import write_image_manifest

    folder = tmp_path / "recipes"
    manifest = write_image_manifest(folder / "data", 4)
    recipe = write_recipe(folder / "r.yaml", {
        "name": "paths", "model": {"arch": "toy-vit-tiny", "pretrained": None, "cache_dir": "weights"},
        "source": {"kind": "manifest", "path": str(manifest.relative_to(folder)),
                   "caption_edit": {"endpoint": "http://127.0.0.1:9/v1", "model": "m", "cache_dir": "edits"}},
        "evaluation": {"zero_shot": [{"name": "z", "path": "sets/z"}]}, "stages": {}})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    loaded = open_pipeline(recipe, None).recipe
    assert loaded.model.cache_dir == str(folder / "weights")
    assert loaded.source.caption_edit.cache_dir == str(folder / "edits")
    assert loaded.evaluation.zero_shot[0].path == str(folder / "sets" / "z")
