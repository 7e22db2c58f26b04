"""The install: every package the code imports is declared, no installed package overwrites another's files (two
OpenCV wheels, two faiss wheels), `pip check` is clean, and a double faiss install is named in one line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import REPO

PACKAGE_DIRS = ("pipeline", "stages", "models", "training", "toyworld", "cli", "bench")
#: imported by name in a comment-free way but provided by the standard library or by our own package
OURS = {"saferclip_data"}


def _declared() -> dict[str, set[str]]:
    """Distribution names (normalised) of the base install and of each extra, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    out = {"base": names(project["dependencies"])}
    for extra, requirements in project["optional-dependencies"].items():
        out[extra] = {n for n in names(requirements) if n != "saferclip-data"}
    return out


def _imported_modules() -> set[str]:
    found = set()
    for folder in PACKAGE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - OURS - set(sys.stdlib_module_names) - {"__future__"}


def test_every_imported_package_is_declared():
    """A module the code imports comes from a distribution named in the dependencies or in an extra."""
    declared = set().union(*_declared().values())
    providers = metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules()):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists:
            continue  # not installed here (an optional GPU package): nothing to compare
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_base_install_leaves_the_optional_heavyweights_out():
    base = _declared()["base"]
    assert not base & {"img2dataset", "openai", "faiss-gpu", "faiss-gpu-cu12", "caer"}
    assert "faiss-cpu" in base and "ray" in base
    assert "img2dataset" in _declared()["download"] and "openai" in _declared()["llm"]


def _file_owners() -> dict[tuple[str, str], list[str]]:
    """Pairs of installed distributions that both install a path with different content (one overwrote the
    other's file): (first, second) -> paths."""
    owners: dict[str, tuple[str, str | None]] = {}
    clashes: dict[tuple[str, str], list[str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        for file in dist.files or []:
            path = str(file)
            if ".dist-info/" in path or "__pycache__" in path or path.startswith(".."):
                continue
            digest = file.hash.value if file.hash else None
            if path in owners and owners[path][0] != name and owners[path][1] != digest:
                clashes.setdefault(tuple(sorted((owners[path][0], name))), []).append(path)
            owners[path] = (name, digest)
    return clashes


def test_no_installed_package_overwrites_another_ones_files():
    """Two wheels writing one folder (opencv-python and opencv-contrib-python's cv2/, faiss-cpu and faiss-gpu's
    faiss/) leave whichever came last: the tests would run another OpenCV or faiss than users get."""
    clashes = _file_owners()
    assert not clashes, {k: v[:3] for k, v in clashes.items()}


def test_pip_check_is_clean():
    """(On a GPU machine whose faiss-cpu was swapped for the GPU wheel, as the README says, pip names the base's
    faiss-cpu requirement: that one line is expected there.)"""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    swapped = any(d.metadata["Name"].startswith("faiss-gpu") for d in metadata.distributions())
    problems = [line for line in lines if not (swapped and "requires faiss-cpu, which is not installed" in line)]
    assert result.returncode == 0 or (swapped and not problems), result.stdout + result.stderr


def test_a_double_faiss_install_is_named_in_one_line(monkeypatch):
    from saferclip_data.stages import knn

    assert knn.faiss_install_problem() is None  # this environment has one faiss
    versions = {"faiss-cpu": "1.12.0", "faiss-gpu-cu12": "1.12.0"}

    def version(name: str) -> str:
        if name in versions:
            return versions[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    problem = knn.faiss_install_problem()
    assert problem and "\n" not in problem
    assert "faiss-cpu 1.12.0" in problem and "faiss-gpu-cu12 1.12.0" in problem and "pip uninstall -y" in problem


@pytest.mark.parametrize(("key", "module", "extra"), [("download", "img2dataset", "download"),
                                                      ("caption_edit", "openai", "llm")])  # fmt: skip
def test_a_recipe_needing_a_missing_extra_names_it_at_validate(tmp_path, monkeypatch, key, module, extra):
    import importlib.util

    from saferclip_data.stages.source_config import SourceConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    manifest = tmp_path / "m.csv"
    manifest.write_text("key,caption,image\na,a cat,http://127.0.0.1:9/a.jpg\n")
    settings = {"download": {}} if key == "download" else {"caption_edit": {"model": "m", "endpoint": "http://x"}}
    with pytest.raises(ValueError, match=rf"source.{key}: needs the {module} package: pip install "
                                         rf"'saferclip-data\[{extra}\]'"):  # fmt: skip
        SourceConfig(kind="manifest", path=str(manifest), **settings)
