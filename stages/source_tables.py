"""A manifest or hub source's tables: read, expanded from their layout (ViSU, NSFW-Caps, LAION) or keyed as
plain tables, and checked for the columns the recipe names."""

from __future__ import annotations

from pathlib import PurePosixPath

import pyarrow as pa

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.stages import layouts, readers
from saferclip_data.stages.source_config import SourceConfig, SourcePart


def read_part(part: SourcePart) -> tuple[pa.Table, str]:
    """A manifest file or a hub data set as an Arrow table, and where it came from (one-line errors)."""
    if part.hub_dataset:
        try:
            import datasets
        except ImportError:
            raise UserError(
                "source: hub data sets need the datasets package: pip install 'saferclip-data[hub]'"
            ) from None
        split = part.hub_split or "train"
        try:
            return datasets.load_dataset(part.hub_dataset, split=split).data.table, part.hub_dataset
        except Exception as exc:  # offline, unknown id, gated: one clear line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"source: cannot load hub data set {part.hub_dataset} ({split}): {first}") from None
    path = part.path
    try:
        return readers.read_manifest(path, readers.manifest_format(path, part.format)), path
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise UserError(f"source: cannot read manifest {path}: {str(exc).splitlines()[0]}") from None

def part_records(c: SourceConfig, part: SourcePart) -> tuple[pa.Table, str]:
    """One table as records: expanded from its layout, or as it is (plain) with a key and split added."""
    table, where = read_part(part)
    if part.layout != "plain":
        try:
            table = layouts.expand(table, part.layout, f"source {where}", split=part.split,
                                   coco_root=part.coco_root, coco_url=part.coco_url,
                                   punsafe_threshold=c.punsafe_threshold or 0.5)  # fmt: skip
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return table, where
    if c.key_column not in table.column_names and len(c.table_parts()) > 1:
        stem = readers.sanitize_key(PurePosixPath(storage.name(where)).stem)
        table = table.append_column(c.key_column, pa.array([f"{stem}_{i:09d}" for i in range(table.num_rows)]))
    if part.split is not None and "split" not in table.column_names:
        table = table.append_column("split", pa.array([part.split] * table.num_rows, pa.string()))
    return table, where

def manifest_table(c: SourceConfig) -> pa.Table:
    """Every table part of a manifest or hub source as records, checked for the columns the recipe names."""
    tables, names = zip(*(part_records(c, p) for p in c.table_parts()))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    path = ", ".join(names)
    if c.caption_column not in table.column_names and c.image_column not in table.column_names:
        raise UserError(
            f"source: manifest {path} has neither caption column '{c.caption_column}' nor image column "
            f"'{c.image_column}' (columns: {', '.join(table.column_names)})"
        )
    missing = [col for col in c.extra_columns if col not in table.column_names]
    if missing:
        raise UserError(f"source.extra_columns: {path} has no column {', '.join(missing)}")
    return table
