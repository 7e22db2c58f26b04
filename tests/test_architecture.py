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


#: (importer prefix, imported prefix): arrows allowed by the layers but not wanted: the demo off the load path
FORBIDDEN = (
    ("saferclip_data.stages", "saferclip_data.toyworld"),
    ("saferclip_data.models", "saferclip_data.toyworld"),
)


def violations(arrows: set[tuple[str, str, str]]) -> list[str]:
    """Every broken rule, one line each: upward imports, forbidden arrows, circles, another module's private names."""
    pairs = sorted({(source, target) for source, target, _ in arrows})
    problems = [
        f"demo on the load path: {source} imports {target} (the toy world provides through entry points)"
        for source, target in pairs
        for low, high in FORBIDDEN
        if (source == low or source.startswith(low + ".")) and (target == high or target.startswith(high + "."))
    ]
    problems += [
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
    problems = violations(bad | {("saferclip_data.stages.embed", "saferclip_data.toyworld.pretrain", "")})
    assert any(p.startswith("upward import: saferclip_data.pipeline.stage") for p in problems), problems
    assert any(p.startswith("demo on the load path: saferclip_data.stages.embed") for p in problems), problems
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


# ---- sizes and the command layer ----------------------------------------------------------------------------
#: libraries that do data or model work: a command module that imports one does more than handle arguments
DATA_LIBRARIES = frozenset({"numpy", "pyarrow", "polars", "torch", "faiss", "PIL", "open_clip", "webdataset",
                            "pandas", "sklearn", "ray"})  # fmt: skip
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_COMMAND_STATEMENTS = 400, 60, 25


def _body(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    """A function's statements after its docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def size_problems(modules: dict[str, Path]) -> list[str]:
    """Modules over 400 lines and functions whose body (after the signature and docstring) is over 60 lines."""
    problems = []
    for module, path in modules.items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            problems.append(f"long module: {module} has {text.count(chr(10))} lines (most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body(node):
                lines = node.end_lineno - _body(node)[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    problems.append(f"long function: {module}.{node.name} has {lines} lines of body "
                                    f"(most {MAX_FUNCTION_LINES})")  # fmt: skip
    return problems


def command_problems(modules: dict[str, Path]) -> list[str]:
    """A command module (``cli/``) only handles arguments: it imports no data or model library, and no function
    of it has more than 25 statements (checks, one call into the layers below, printing what came back)."""
    problems = []
    for module, path in modules.items():
        if not module.startswith("saferclip_data.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            problems += [f"command does data work: {module} imports {n}" for n in names
                         if n.split(".")[0] in DATA_LIBRARIES]  # fmt: skip
            if isinstance(node, ast.FunctionDef):
                count = sum(isinstance(x, ast.stmt) for stmt in _body(node) for x in ast.walk(stmt))
                if count > MAX_COMMAND_STATEMENTS:
                    problems.append(f"command does data work: {module}.{node.name} has {count} statements "
                                    f"(most {MAX_COMMAND_STATEMENTS}; move the work below cli/)")  # fmt: skip
    return problems


def test_no_module_or_function_is_too_long_and_commands_stay_thin() -> None:
    modules = package_modules()
    problems = size_problems(modules) + command_problems(modules)
    assert not problems, "\n".join(problems)


def test_the_size_and_command_rules_can_fail(tmp_path: Path) -> None:
    lines = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "long.py").write_text(f"def f():\n    \"\"\"Doc.\"\"\"\n{lines}\n" + "# pad\n" * 340)
    (tmp_path / "cmd.py").write_text("import numpy as np\n\n\ndef run():\n" + "\n".join(
        f"    if np.pi > {i}:\n        print({i})" for i in range(13)) + "\n")
    modules = {"saferclip_data.stages.long": tmp_path / "long.py", "saferclip_data.cli.cmd": tmp_path / "cmd.py"}
    problems = size_problems(modules) + command_problems(modules)
    assert any(p.startswith("long module: saferclip_data.stages.long has 403") for p in problems), problems
    assert any(p.startswith("long function: saferclip_data.stages.long.f has 61") for p in problems), problems
    assert "command does data work: saferclip_data.cli.cmd imports numpy" in problems, problems
    assert any(p.startswith("command does data work: saferclip_data.cli.cmd.run has 26") for p in problems), problems
