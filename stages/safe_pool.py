"""The neighbours stage's safe pool on disk: one piece per dedup shard, memory-mapped by every worker.

A piece holds the pool records of one shard (safe, not in an excluded split): their keys, a 64-bit hash of
their group and, when a category bound is set, their highest score per category (``keys/<n>.parquet``), and
per embedding kind the fp16 rows of those that have one with their row numbers in the piece
(``<kind>/<n>.npy``, ``<kind>/<n>.rows.npy``). Pieces are written by tasks, so no process gathers the pool;
workers map the vector files and search them block by block (exact) or through an IVF index built once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline.stage import worker_identity
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_npy, atomic_write_parquet
from saferclip_data.stages.columns import column_part, unit_rows


def group_hash(groups: list[Any]) -> np.ndarray:
    """64-bit hashes of group ids (compared instead of the strings: 8 bytes a pool row)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(g).encode(), digest_size=8).digest(), "little", signed=True)
         for g in groups], np.int64)  # fmt: skip


def pool_piece(root: str, inputs: dict, config: dict, kinds: list[str], shard_id: str, index: int) -> dict:
    """Write the pool piece of one dedup shard; returns its row counts (all, and per embedding kind)."""
    wd = WorkDir(root)
    folder = wd.stage_dir("neighbours") / "_pool"
    table = wd.read_aligned(shard_id, inputs)
    table = table.filter(pc.equal(table["role"], "safe"))
    if config["exclude_splits"]:
        excluded = pc.is_in(table[config["split_column"]], pa.array(config["exclude_splits"]))
        table = table.filter(pc.invert(pc.fill_null(excluded, False)))
    dim = table.schema.field("text_embedding").type.list_size
    columns = {"key": table["key"], "group": pa.array(group_hash(table[config["group_column"]].to_pylist()))}
    if config.get("category_max_score") is not None:
        columns.update(_category_scores(wd, shard_id, table["key"]))
    (folder / "keys").mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(folder / "keys" / f"{index:06d}.parquet", pa.table(columns))
    valid_counts = {}
    for kind in kinds:
        vectors, valid = unit_rows(table[f"{kind}_embedding"], dim)
        (folder / kind).mkdir(parents=True, exist_ok=True)
        atomic_write_npy(folder / kind / f"{index:06d}.npy", vectors[valid].astype(np.float16))
        atomic_write_npy(folder / kind / f"{index:06d}.rows.npy", np.flatnonzero(valid).astype(np.int64))
        valid_counts[kind] = int(valid.sum())
    return {"rows": table.num_rows, "valid": valid_counts, "dim": dim, **worker_identity()}


def _category_scores(wd: WorkDir, shard_id: str, keys: pa.ChunkedArray) -> dict[str, pa.Array]:
    """Per category suffix, the pool records' max(image, text) score from the score stage (null: none)."""
    names = [n for n in wd.shard_columns("score", shard_id) if "_score_" in n]
    scores = wd.read_shard("score", shard_id, ["key", *names])
    take = pc.index_in(keys, value_set=scores["key"])
    best: dict[str, np.ndarray] = {}
    for name in names:
        suffix = name.split("_score_", 1)[1]
        values = np.asarray(scores[name].take(take).fill_null(np.nan).to_numpy(zero_copy_only=False), np.float64)
        best[suffix] = np.fmax(best.get(suffix, np.full(len(values), np.nan)), values)
    return {f"score_{suffix}": pa.array(v, pa.float32(), mask=np.isnan(v)) for suffix, v in best.items()}


@dataclass
class PoolKind:
    """The searchable rows of one embedding kind: the memory-mapped pieces and each row's pool row number."""

    pieces: list[np.ndarray]
    pool_rows: np.ndarray  # searchable row -> pool row
    index: Any = None  # an IVF index, or None for the exact search
    index_kind: str = "exact"

    def __len__(self) -> int:
        return len(self.pool_rows)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive pieces joined into blocks of up to ``rows`` rows (few large searches, not many small)."""
        yield from piece_blocks(self.pieces, rows)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The fp16 rows of these searchable row ids (any order)."""
        starts = np.cumsum([0] + [len(p) for p in self.pieces])
        piece = np.searchsorted(starts, ids, side="right") - 1
        out = np.empty((len(ids), self.pieces[0].shape[1]), np.float16)
        for p in np.unique(piece):
            at = piece == p
            out[at] = self.pieces[p][ids[at] - starts[p]]
        return out


class RowView:
    """``view[ids]`` = the rows of a :class:`PoolKind` (what the IVF re-scoring indexes)."""

    def __init__(self, kind: PoolKind):
        self.kind = kind

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        return self.kind.rows(np.asarray(ids, np.int64))


def piece_blocks(pieces: list[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    size = 0
    for piece in pieces:
        for start in range(0, len(piece), rows):
            part = piece[start : start + rows]
            if size + len(part) > rows and pending:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, size = [], 0
            pending.append(part)
            size += len(part)
    if pending:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


@dataclass
class SafePool:
    """What a worker holds of the pool: keys (one Arrow string array), group hashes, category scores, and per
    embedding kind the mapped vector pieces (paged in by the OS, shared between workers on a node)."""

    keys: pa.Array
    groups: np.ndarray
    scores: dict[str, np.ndarray]
    kinds: dict[str, PoolKind]
    _positions: dict[str, int] | None = None

    @classmethod
    def load(cls, folder: Path, kinds: list[str]) -> SafePool:
        import faiss

        info = json.loads((folder / "pool.json").read_text())
        count = info["pieces"]
        tables = [pq.read_table(folder / "keys" / f"{i:06d}.parquet") for i in range(count)]
        table = pa.concat_tables(tables)
        scores = {n.removeprefix("score_"): np.asarray(table[n].fill_null(np.nan).to_numpy(), np.float32)
                  for n in table.column_names if n.startswith("score_")}  # fmt: skip
        offsets = np.cumsum([0] + [t.num_rows for t in tables])
        loaded = {}
        for kind in kinds:
            pieces = [np.load(folder / kind / f"{i:06d}.npy", mmap_mode="r") for i in range(count)]
            rows = [np.load(folder / kind / f"{i:06d}.rows.npy") + offsets[i] for i in range(count)]
            index_kind = info["index"].get(kind, "exact")
            # ivf_flat is searched by list in tasks (see ivf_partitioned): only ivf_pq keeps an index in a worker
            index = faiss.read_index(str(folder / f"{kind}.ivf")) if index_kind == "ivf_pq" else None
            loaded[kind] = PoolKind(pieces, np.concatenate(rows), index, index_kind)
        groups = table["group"].to_numpy()
        return cls(table["key"].combine_chunks(), groups, scores, loaded)

    def key(self, pool_row: int) -> str:
        return self.keys[pool_row].as_py()

    def position(self, key: str) -> int | None:
        """The pool row of a key (an index built on first use: only the given-pair margin asks)."""
        if self._positions is None:
            self._positions = {k: i for i, k in enumerate(self.keys.to_pylist())}
        return self._positions.get(key)

    def category_score(self, pool_row: int, category: str) -> float | None:
        values = self.scores.get(column_part(category))
        if values is None or np.isnan(values[pool_row]):
            return None
        return float(values[pool_row])


def pool_keys(workdir: WorkDir) -> list[str]:
    """Every key of a finished neighbours stage's safe pool."""
    folder = workdir.stage_dir("neighbours") / "_pool"
    info = json.loads((folder / "pool.json").read_text())
    tables = [pq.read_table(folder / "keys" / f"{i:06d}.parquet", columns=["key"]) for i in range(info["pieces"])]
    return [k for table in tables for k in table["key"].to_pylist()]
