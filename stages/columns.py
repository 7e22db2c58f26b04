"""Every column one stage writes for another: its name, its type and the stage that writes it, and from them
the ``pa.Schema`` of each stage's output for a recipe (the engine checks every shard written against it).

A name may hold ``{m}`` (a mined modality's column part: ``text``, ``image``, ``text_image``, ``image_text``),
``{e}`` (an embedding: ``image``, ``text``) or ``{c}`` (a score category's column part, e.g. ``self_harm``); the
recipe decides which exist. Where a type depends on the data (an embedding's width, a source's own columns) it is
a pattern over pyarrow's type names, ``*`` matching anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from saferclip_data.pipeline.schema import field_like
from saferclip_data.pipeline.stage import STAGE_CONFIGS

VECTOR = "fixed_size_list<element: halffloat>[*]"
STRING, FLOAT = pa.string(), pa.float32()


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType | str  # a pattern over pyarrow's type names where the width or type depends on the data
    stage: str
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("key", STRING, "source", "the record's id, unique, carried by every stage"),
    Column("caption", STRING, "source", "the caption (null: none)"),
    Column("image", pa.binary(), "source", "encoded image bytes (null: none, or only a URL)"),
    Column("group", STRING, "source", "the record's group (a quadruplet's safe and unsafe records share it)"),
    Column("label", STRING, "source", "the source's own safe/unsafe label"),
    Column("category", STRING, "source", "the unsafe category (source label, later the scores' choice)"),
    Column("{e}_embedding", VECTOR, "embed", "unit-norm embedding, fp16 (null: no image / no caption)"),
    Column("alignment", FLOAT, "score", "image-caption cosine"),
    Column("{e}_score_{c}", FLOAT, "score", "zero-shot score of a category"),
    Column("{e}_unsafe_score", FLOAT, "score", "the highest category score"),
    Column("{e}_top_category", STRING, "score", "the category with the highest score"),
    Column("probe_{e}_score_{c}", FLOAT, "score", "a cross-fitted probe's probability of a category"),
    Column("{x}", FLOAT, "score", "an image classifier's score: <its name>_<its category>"),
    Column("label_role", STRING, "score", "safe/unsafe read from the recipe's role column"),
    Column("label_category", STRING, "score", "the source's category label"),
    Column("label_source", STRING, "score", "the column the label came from"),
    Column("role", STRING, "filter", "safe or unsafe, from the label where there is one, else the scores"),
    Column("role_source", STRING, "filter", "label or scores"),
    Column("unsafe_score", FLOAT, "filter", "the score the role was decided on"),
    Column("duplicates", pa.int32(), "dedup", "near-duplicates this kept record absorbed"),
    Column("given_pair", STRING, "neighbours", "the given safe partner's key (ViSU-style), if any"),
    Column("{m}_candidates", pa.list_(STRING), "neighbours", "admissible safe candidates, nearest first"),
    Column("{m}_similarities", pa.list_(FLOAT), "neighbours", "their cosines (mine: its targets')"),
    Column("{m}_pair_similarity", FLOAT, "neighbours", "cosine to the given safe partner"),
    Column("{m}_targets", pa.list_(STRING), "mine", "the chosen targets under the reuse cap"),
    Column("{m}_margin", FLOAT, "mine", "top-1 target similarity minus the given pair's"),
    Column("{m}_difficulty", STRING, "mine", "easy, medium or hard (tertiles of top-1 similarity)"),
    Column("benchmark_id", STRING, "benchmark", "the quadruplet a selected record belongs to"),
    Column("held_out", pa.bool_(), "benchmark", "the record is in a benchmark split"),
    Column("training", STRING, "shards", "where the record went (quad, plain) or why not"),
    Column("tar", STRING, "shards", "its tar, relative to the shards folder"),
)
_BY_NAME = {c.name: c for c in COLUMNS}


def column_part(name: str) -> str:
    """A modality or category name as a column-name part: ``illegal activity`` -> ``illegal_activity``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def fields(*names: str, m: list[str] = (), e: list[str] = ("image", "text"), c: list[str] = (),
           x: list[str] = ()) -> list[pa.Field]:  # fmt: skip
    """The declared fields for these column names, placeholders expanded over the given modalities (``m``),
    embeddings (``e``), categories (``c``) and classifier columns (``x``), in that order of nesting."""
    out = []
    for name in names:
        column = _BY_NAME[name]
        for mod in m if "{m}" in name else [""]:
            for emb in e if "{e}" in name else [""]:
                for cat in c if "{c}" in name else [""]:
                    for own in x if "{x}" in name else [""]:
                        concrete = name.format(m=column_part(mod), e=emb, c=column_part(cat), x=own)
                        out.append(field_like(concrete, column.type) if isinstance(column.type, str)
                                   else pa.field(concrete, column.type))
    return out


def schema(*groups: list[pa.Field]) -> pa.Schema:
    """A stage's output schema from groups of fields (later duplicates of a name are dropped)."""
    seen, out = set(), []
    for group in groups:
        for f in group:
            if f.name not in seen:
                seen.add(f.name)
                out.append(f)
    return pa.schema(out)


def mined_modalities(sections: dict) -> list[str]:
    """The modalities the recipe mines (``stages.neighbours.modalities``), as column-name parts."""
    neighbours = sections.get(STAGE_CONFIGS, {}).get("neighbours")
    return [column_part(m) for m in (neighbours.modalities if neighbours is not None else ["text"])]


def unit_rows(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list embedding column as a float32 matrix (null rows are zeros) and its validity mask."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    values = column.flatten() if column.null_count == 0 else column.fill_null([0.0] * dim).flatten()
    matrix = np.asarray(values.to_numpy(zero_copy_only=False), np.float32).reshape(len(column), dim)
    return matrix, valid
