"""The house rule, checked on the source: imports only point down the layers, and no module sits in a circle.

Layers (ARCHITECTURE.md): the engine knows nothing of CLIP or safety; the model floor loads, decodes and
tokenizes; the toy world builds on the model floor; stages and trainer build on both; the benchmarks (and the
toy audit, which reads finished builds) build on the stages; commands sit on top. Imports inside functions count:
a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: module prefix -> layer; the longest matching prefix decides
LAYERS = {
    "saferclip_data.pipeline": 0,
    "saferclip_data.recipes": 0,
    "saferclip_data.models": 1,
    "saferclip_data.toyworld": 2,
    "saferclip_data.stages": 3,
    "saferclip_data.training": 3,
    "saferclip_data.toyworld.audit": 4,
    "saferclip_data.bench": 4,
    "saferclip_data.cli": 5,
}


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package, by its import name, from pyproject's package-dir map."""
    package_dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_arrows(modules: dict[str, Path]) -> set[tuple[str, str, str]]:
    """(importer, imported module, imported name) for every package import, relative ones resolved."""
    arrows: set[tuple[str, str, str]] = set()
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [(alias.name, "") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                found = [(f"{base}.{alias.name}", alias.name) for alias in node.names]
            else:
                continue
            for name, imported in found:
                target = _known(name, modules)
                if target and target != module:
                    arrows.add((module, target, "" if name == target else imported))
    return arrows


def private_attribute_uses(modules: dict[str, Path]) -> set[tuple[str, str, str]]:
    """(importer, module, name) wherever a module imported whole is used for one of its ``_private`` names
    (``from saferclip_data.stages import lists; lists._save(...)``)."""
    uses: set[tuple[str, str, str]] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saferclip_data"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                uses.add((module, aliases[node.value.id], node.attr))
    return uses


def layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS (and ARCHITECTURE.md)")
    return LAYERS[max(matches, key=len)]


def circles(arrows: set[tuple[str, str, str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (Tarjan's strongly connected parts)."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in arrows:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(arrows: set[tuple[str, str, str]]) -> list[str]:
    """Every broken rule, one line each: upward imports, circles, another module's private names."""
    pairs = sorted({(source, target) for source, target, _ in arrows})
    problems = [
        f"upward import: {source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, target in pairs
        if layer(target) > layer(source)
    ]
    problems += [f"import circle: {' <-> '.join(group)}" for group in circles(arrows)]
    problems += [
        f"private import: {source} imports {target}.{name}"
        for source, target, name in sorted(arrows)
        if name.startswith("_") and not name.startswith("__")
    ]
    return problems


def test_imports_point_down_the_layers_without_circles() -> None:
    modules = package_modules()
    arrows = import_arrows(modules)
    assert len(arrows) > 100, "the scan found too few imports to be reading the package"
    problems = violations(arrows | private_attribute_uses(modules))
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_upward_import_a_circle_and_a_private_import() -> None:
    arrows = import_arrows(package_modules())
    bad = arrows | {
        ("saferclip_data.pipeline.stage", "saferclip_data.stages.embed", "EmbedStage"),
        ("saferclip_data.stages.knn", "saferclip_data.stages.score", "column_suffix"),
        ("saferclip_data.stages.score", "saferclip_data.stages.knn", "_private_helper"),
    }
    problems = violations(bad)
    assert any(p.startswith("upward import: saferclip_data.pipeline.stage") for p in problems), problems
    assert any(p.startswith("import circle:") and "saferclip_data.stages.knn" in p for p in problems), problems
    assert any(p.startswith("private import: saferclip_data.stages.score") for p in problems), problems


def test_every_package_folder_is_in_a_layer() -> None:
    for module in package_modules():
        layer(module)  # raises for a module outside every layer


def test_a_private_helper_reached_through_its_module_is_caught(tmp_path: Path) -> None:
    (tmp_path / "lists.py").write_text("def _save(path):\n    return path\n")
    (tmp_path / "user.py").write_text("from saferclip_data.stages import lists\n\nlists._save('x')\n")
    modules = {"saferclip_data.stages.lists": tmp_path / "lists.py", "saferclip_data.stages.user": tmp_path / "user.py"}
    problems = violations(import_arrows(modules) | private_attribute_uses(modules))
    assert problems == ["private import: saferclip_data.stages.user imports saferclip_data.stages.lists._save"]
