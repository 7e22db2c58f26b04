"""Recipe loading: safe YAML, ``${ENV}`` interpolation, pydantic validation with one-line errors.

The engine does not know which sections or stages exist: the caller passes the top-level section models
(``source``, ``model``, ...) and the stage registry, and :func:`load_recipe` assembles the schema from them.
"""

from __future__ import annotations

import difflib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import RecipeError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RecipeHeader(BaseModel):
    """Keys every recipe has, whatever its stages."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="recipe name; the default work dir is work/<name>")
    workdir: str | None = Field(default=None, description="work dir; relative paths resolve against the recipe")
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per protocol (s3, gs, hf, ...), options of its file system, e.g. s3: {endpoint_url: ...}; "
        "used in memory only, never written anywhere (use ${ENV} for secrets)",
    )


#: what a recipe may expand to: YAML aliases can make a few lines mean billions of values ("billion laughs")
MAX_VALUES = 100_000
MAX_DEPTH = 64


def _safe_yaml(text: str, file: str) -> Any:
    """``yaml.safe_load``, refusing in one line what would hang or crash later: an alias bomb (more than
    MAX_VALUES values once aliases are expanded), an anchor that contains itself, nesting deeper than
    MAX_DEPTH, and a key given twice in one mapping (YAML lets the second silently win)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeError(file, "", f"nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _check_nodes(node, file)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_nodes(root: yaml.Node, file: str) -> None:
    """Walk the composed YAML graph once (aliases are shared nodes): its expanded size, cycles, depth, keys."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool, str]] = [(root, 0, False, "")]
    while stack:
        node, depth, finished, where = stack.pop()
        if finished:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in _children(node))
            if size[id(node)] > MAX_VALUES:
                line = node.start_mark.line + 1
                raise RecipeError(file, where, f"line {line}: expands to more than {MAX_VALUES:,} values (aliases?)")
            continue
        if id(node) in size:
            continue
        line = node.start_mark.line + 1
        if id(node) in on_path:
            raise RecipeError(file, where, f"line {line}: an anchor contains itself")
        if depth > MAX_DEPTH:
            raise RecipeError(file, where, f"line {line}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(id(node))
        stack.append((node, depth, True, where))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                path = f"{where}.{name}" if where else name
                if isinstance(key, yaml.ScalarNode) and name in seen:
                    twice = f"lines {seen[name]} and {key.start_mark.line + 1}"
                    raise RecipeError(file, path, f"key given twice ({twice}); YAML would keep the second silently")
                seen[name] = key.start_mark.line + 1
                stack += [(key, depth + 1, False, path), (value, depth + 1, False, path)]
        else:
            stack.extend((child, depth + 1, False, f"{where}[{i}]") for i, child in enumerate(_children(node)))


def _key_path(loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into the dotted key path a user sees in the YAML."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def interpolate_env(node: Any, file: str, path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(node, dict):
        return {k: interpolate_env(v, file, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_env(v, file, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    raise RecipeError(file, path, f"environment variable {name} is not set (use ${{{name}:-default}})")
                return default
            return value

        return _ENV_PATTERN.sub(substitute, node)
    return node


@lru_cache(maxsize=8)
def _schema(sections: tuple[tuple[str, type[BaseModel], bool], ...], stages: tuple[tuple[str, type], ...]):
    stage_fields = {name: (cls.Config | None, None) for name, cls in stages}
    stages_model = create_model("Stages", __config__=ConfigDict(extra="forbid"), **stage_fields)
    fields: dict[str, Any] = {"stages": (stages_model, ...)}
    for name, model, required in sections:
        fields[name] = (model, ...) if required else (model | None, None)
    return create_model("Recipe", __base__=RecipeHeader, **fields)


def _suggestion(schema: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """' (did you mean 'x'?)' for an unknown key close to a known one at the same place, else ''."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        candidates = [a for a in getattr(field.annotation, "__args__", ()) if isinstance(a, type)]
        model = next((a for a in (field.annotation, *candidates)
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)  # fmt: skip
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_path(value: str | None, info: Any) -> str | None:
    """A recipe path field's validator: relative paths resolve against the recipe's folder (the validation
    context's ``base_dir``), ``~`` expands; URLs stay as they are."""
    if value is None or "://" in value:
        return value
    base = (getattr(info, "context", None) or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path)


def load_recipe(
    path: str | Path,
    sections: dict[str, tuple[type[BaseModel], bool]],
    stages: dict[str, type],
) -> BaseModel:
    """Load and validate a recipe file.

    ``sections`` maps a top-level key to ``(model, required)``; ``stages`` is the stage registry (name ->
    stage class with a ``Config`` model). Every failure raises :class:`RecipeError` naming file and key path.
    Validators may read ``info.context["base_dir"]`` (the recipe's folder) to resolve relative paths.
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError(file, "", "recipe file not found")
    try:
        raw = _safe_yaml(path.read_text(encoding="utf-8"), file)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(file, "", f"invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(file, "", "not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise RecipeError(file, "", f"expected a mapping of recipe keys, got {type(raw).__name__}")
    raw = interpolate_env(raw, file)
    options = raw.get("storage_options")
    if isinstance(options, dict) and all(isinstance(v, dict) for v in options.values()):
        storage.configure(options)  # before validation: the source's checks may read a bucket
    schema = _schema(tuple((k, m, r) for k, (m, r) in sections.items()), tuple(sorted(stages.items())))
    try:
        return schema.model_validate(raw, context={"base_dir": path.resolve().parent, "file": file})
    except ValidationError as exc:
        errors = exc.errors()
        # a misspelt key also makes the real one look missing: report the unknown key first, with a suggestion
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        key = _key_path(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        # a model-level check names the exact key itself ("source.path: ..."): use it as the key path
        named = re.match(r"^([A-Za-z_][\w.\[\]]*): ", msg)
        if named and (not key or named.group(1).startswith(key)):
            key, msg = named.group(1), msg[named.end() :]
        if first["type"] == "extra_forbidden":
            msg = "unknown key" + _suggestion(schema, first["loc"])
        elif first["type"] == "missing":
            msg = "required key is missing"
        elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
            shown = repr(first["input"])
            msg = f"{msg} (got {shown[:60]})"
        more = len(errors) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise RecipeError(file, key, msg) from None
