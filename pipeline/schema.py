"""Declared output schemas: what a stage promises to write, checked on every shard it writes.

A stage declares a ``pa.Schema`` for its output shards (``Stage.output_schema``). A field whose type depends on
the data (an embedding's width, a source's own columns) carries a pattern instead, as field metadata
``{"type": "fixed_size_list<element: halffloat>[*]"}`` (``*`` matches anything). The runner stores the declared
columns in the stage's manifest; the work dir checks each shard against them before writing it, so a column no
stage declared never reaches a later stage (or a user) unnoticed.
"""

from __future__ import annotations

import re

import pyarrow as pa

from saferclip_data.pipeline.errors import UserError

#: field-metadata key holding a type pattern
TYPE_PATTERN = b"type"


class SchemaError(UserError):
    """A shard does not match its stage's declared schema (a bug in the stage, or a stage out of date)."""


def field_like(name: str, pattern: str = "*") -> pa.Field:
    """A declared column whose type is given as a pattern over pyarrow's type names (``*`` matches anything)."""
    return pa.field(name, pa.null(), metadata={TYPE_PATTERN: pattern.encode()})


def declared_columns(schema: pa.Schema) -> dict[str, str]:
    """name -> type pattern, as stored in the manifest."""
    out = {}
    for f in schema:
        pattern = (f.metadata or {}).get(TYPE_PATTERN)
        out[f.name] = pattern.decode() if pattern is not None else str(f.type)
    return out


def check_table(stage: str, table: pa.Table, declared: dict[str, str]) -> None:
    """Raise :class:`SchemaError` naming the stage and the first column that is not declared or not of its type."""
    for f in table.schema:
        if f.name not in declared:
            raise SchemaError(f"stage {stage} wrote column '{f.name}', which its declared schema does not have "
                              f"(declared: {', '.join(declared)})")  # fmt: skip
        if not _matches(str(f.type), declared[f.name]) and not pa.types.is_null(f.type):
            raise SchemaError(f"stage {stage} wrote column '{f.name}' as {f.type}; its declared schema says "
                              f"{declared[f.name]}")  # fmt: skip


def _matches(type_name: str, pattern: str) -> bool:
    """Whether a type's name fits a declared pattern (``*``: anything), list fields' names aside
    (``list<item: string>`` and ``list<element: string>``, as parquet reads it back, are the same type)."""
    unnamed = re.sub(r"<\w+: ", "<", type_name)
    wanted = re.escape(re.sub(r"<\w+: ", "<", pattern)).replace(r"\*", ".*")
    return re.fullmatch(wanted, unnamed) is not None
