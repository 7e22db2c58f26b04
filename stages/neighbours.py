"""The neighbours stage: for each unsafe record, its nearest safe records over the whole safe pool.

This is the distributed half of mining. ``prepare`` (on the driver, once) gathers the safe pool - every safe
record that survived filter and dedup, minus benchmark splits - into one float16 matrix per modality, written
next to the stage's outputs; each worker memory-maps it once, and the unsafe queries of each shard are searched
against it exactly (see :mod:`knn`). Exclusions that depend on the query (its own group, category compatibility)
are applied here, so the ``candidates`` kept per query are all admissible; the ``mine`` stage then picks the final
targets under the global reuse cap.

Modalities: ``text`` (caption -> safe caption, the paper's choice), ``image`` (image -> safe image), and the
cross-modal ``text-image`` (caption -> safe image) and ``image-text``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import BatchResult, ShardSpec, Stage, StageConfig
from saferclip_data.pipeline.workdir import WorkDir

from .knn import knn_search
from .score import column_suffix, unit_rows

Modality = Literal["text", "image", "text-image", "image-text"]
POOL_DIR = "_pool"


def query_and_pool(modality: str) -> tuple[str, str]:
    """Which embedding the query uses and which the pool uses: ``text-image`` = caption query, image pool."""
    query, _, pool = modality.partition("-")
    return query, pool or query


class NeighboursConfig(StageConfig):
    batch_size: int = Field(default=4096, gt=0)
    gpus: float | Literal["auto"] = "auto"
    modalities: list[Modality] = Field(
        default_factory=lambda: ["text"],
        min_length=1,
        description="text (the paper's choice), image, text-image, image-text",
    )
    candidates: int = Field(default=32, gt=0, description="admissible safe candidates kept per query and modality")
    allow_same_group: bool = Field(
        default=False, description="may a record's own group (its quadruplet's safe partner) be a target?"
    )
    group_column: str = Field(default="group", description="source column with the group id")
    exclude_splits: list[str] = Field(
        default_factory=list, description="values of split_column whose safe records are never targets (benchmarks)"
    )
    split_column: str = "split"
    pair_column: str | None = Field(
        default=None, description="source column naming the given safe partner (ViSU-style), for the margin"
    )
    category_max_score: float | None = Field(
        default=None, description="exclude safe targets scoring above this for the query's own category"
    )
    backend: Literal["auto", "faiss", "torch"] = "auto"
    block_rows: int = Field(default=262_144, gt=0, description="pool rows per search block (bounds memory)")

    RUNTIME_FIELDS = StageConfig.RUNTIME_FIELDS | {"backend", "block_rows"}


class NeighboursStage(Stage):
    name = "neighbours"
    Config = NeighboursConfig
    inputs = {"dedup": ("key", "role", "category"), "embed": ("key", "image_embedding", "text_embedding")}
    output_columns = ("key", "role", "category")
    version = "1"

    config: NeighboursConfig

    def _source_columns(self) -> tuple[str, ...]:
        c = self.config
        cols = [c.group_column]
        if c.exclude_splits:
            cols.append(c.split_column)
        if c.pair_column:
            cols.append(c.pair_column)
        return tuple(dict.fromkeys(cols))

    def _inputs(self) -> dict[str, tuple[str, ...]]:
        return {**self.inputs, "source": ("key", *self._source_columns())}

    # ---- driver: the shared safe pool --------------------------------------------------------------------
    def prepare(self, progress, workdir: WorkDir) -> None:
        c = self.config
        shard_ids = workdir.completed_shards("dedup")
        source_cols = set(workdir.shard_columns("source", shard_ids[0])) if shard_ids else set()
        missing = [col for col in self._source_columns() if col not in source_cols]
        if missing:
            raise UserError(f"stages.neighbours: source has no column '{missing[0]}' (add it to source.extra_columns)")
        advance = progress.subtask("gather safe pool", len(shard_ids))
        parts = []
        for shard_id in shard_ids:
            table = workdir.read_aligned(shard_id, self._inputs())
            table = table.filter(pc.equal(table["role"], "safe"))
            if c.exclude_splits:
                table = table.filter(pc.invert(pc.is_in(table[c.split_column], pa.array(c.exclude_splits))))
            parts.append(table)
            advance(1)
        pool = pa.concat_tables(parts) if parts else None
        if pool is None or pool.num_rows == 0:
            raise UserError("stage neighbours: the safe pool is empty (no safe record left after filter and dedup)")
        folder = workdir.stage_dir(self.name) / POOL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        dim = pool.schema.field("text_embedding").type.list_size
        for kind in sorted({query_and_pool(m)[1] for m in c.modalities}):
            vectors, valid = unit_rows(pool[f"{kind}_embedding"], dim)
            # only rows that have this embedding are searchable; rows maps them back to pool keys
            _atomic_save(folder / f"{kind}.npy", vectors[valid].astype(np.float16))
            _atomic_save(folder / f"{kind}_rows.npy", np.flatnonzero(valid).astype(np.int64))
        keys = pool["key"].to_pylist()
        info = {"keys": keys, "groups": [str(g) for g in pool[c.group_column].to_pylist()], "dim": dim}
        if c.category_max_score is not None:
            info["scores"] = self._pool_category_scores(workdir, shard_ids, set(keys))
        tmp = folder / f".pool.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, folder / "pool.json")

    def _pool_category_scores(self, workdir: WorkDir, shard_ids: list[str], keys: set[str]) -> dict[str, dict]:
        """key -> {category suffix: max(image, text) score} for the safe pool, from the score stage."""
        out: dict[str, dict] = {}
        for shard_id in shard_ids:
            names = [n for n in workdir.shard_columns("score", shard_id) if "_score_" in n]
            table = workdir.read_shard("score", shard_id, ["key", *names]).to_pylist()
            for row in table:
                if row["key"] in keys:
                    best: dict[str, float] = {}
                    for name in names:
                        suffix = name.split("_score_", 1)[1]
                        value = row[name]
                        if value is not None:
                            best[suffix] = max(best.get(suffix, 0.0), value)
                    out[row["key"]] = best
        return out

    # ---- worker ------------------------------------------------------------------------------------------
    def _load_pool(self, workdir: WorkDir) -> None:
        if getattr(self, "pool_keys", None) is not None:
            return
        folder = workdir.stage_dir(self.name) / POOL_DIR
        info = json.loads((folder / "pool.json").read_text())
        self.pool_keys = info["keys"]
        self.pool_index = {k: i for i, k in enumerate(self.pool_keys)}
        self.pool_groups = np.array(info["groups"], dtype=object)
        self.pool_scores = info.get("scores")
        self.pool: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind in sorted({query_and_pool(m)[1] for m in self.config.modalities}):
            vectors = np.load(folder / f"{kind}.npy", mmap_mode="r")  # shared, paged in by the OS
            rows = np.load(folder / f"{kind}_rows.npy")
            self.pool[kind] = (vectors, rows)

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        self._load_pool(workdir)
        return workdir.read_aligned(spec.shard_id, self._inputs())

    def process_batch(self, batch: pa.Table) -> BatchResult:
        c = self.config
        n = batch.num_rows
        roles = batch["role"].to_pylist()
        queries = [i for i in range(n) if roles[i] == "unsafe"]
        groups = [str(g) for g in batch[c.group_column].to_pylist()]
        categories = batch["category"].to_pylist()
        pairs = batch[c.pair_column].to_pylist() if c.pair_column else [None] * n
        dim = batch.schema.field("text_embedding").type.list_size
        columns: dict[str, pa.Array] = {
            "key": batch["key"],
            "role": batch["role"],
            "category": batch["category"],
            "given_pair": pa.array(pairs, pa.string()),
        }
        for modality in c.modalities:
            query_kind, pool_kind = query_and_pool(modality)
            vectors, valid = unit_rows(batch[f"{query_kind}_embedding"], dim)
            pool_vectors, pool_rows = self.pool[pool_kind]
            position = {int(r): p for p, r in enumerate(pool_rows)} if c.pair_column else {}
            cand_keys: list[list[str] | None] = [None] * n
            cand_sims: list[list[float] | None] = [None] * n
            pair_sims: list[float | None] = [None] * n
            searchable = [i for i in queries if valid[i]]
            if searchable and len(pool_rows):
                # a little slack for the exclusions applied after the search (own group, category)
                want = min(c.candidates + 8, len(pool_rows))
                sims, idx = knn_search(
                    vectors[searchable], pool_vectors, want, backend=c.backend, block_rows=c.block_rows
                )
                for row, srow, irow in zip(searchable, sims, idx):
                    keys_out, sims_out = [], []
                    for s, j in zip(srow, irow):
                        if j < 0:
                            continue
                        pool_row = int(pool_rows[j])
                        if not self._admissible(pool_row, groups[row], categories[row]):
                            continue
                        keys_out.append(self.pool_keys[pool_row])
                        sims_out.append(float(s))
                        if len(keys_out) == c.candidates:
                            break
                    cand_keys[row], cand_sims[row] = keys_out, sims_out
                    pair = position.get(self.pool_index.get(pairs[row], -1)) if pairs[row] else None
                    if pair is not None:
                        pair_sims[row] = float(vectors[row] @ np.asarray(pool_vectors[pair], np.float32))
            name = column_suffix(modality)
            columns[f"{name}_candidates"] = pa.array(cand_keys, pa.list_(pa.string()))
            columns[f"{name}_similarities"] = pa.array(cand_sims, pa.list_(pa.float32()))
            columns[f"{name}_pair_similarity"] = pa.array(pair_sims, pa.float32())
        return BatchResult(pa.table(columns))

    def _admissible(self, pool_row: int, group: str, category: str | None) -> bool:
        c = self.config
        if not c.allow_same_group and self.pool_groups[pool_row] == group:
            return False
        if c.category_max_score is not None and category and self.pool_scores is not None:
            score = self.pool_scores.get(self.pool_keys[pool_row], {}).get(column_suffix(category))
            if score is not None and score > c.category_max_score:
                return False
        return True


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
