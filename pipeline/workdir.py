"""The work dir: one folder per stage, deterministic file names, atomic writes, per-shard completion markers
and a stage manifest carrying the fingerprint that decides whether a stage is up to date.

Layout of ``<workdir>/<stage>/``::

    _manifest.json              fingerprint, planned shards, complete flag, counts, timings, versions
    part-00000.parquet          kept rows of shard 0 (output columns; schema metadata names the stage)
    part-00000.rejects.parquet  rejected rows: key, stage, reason, error
    part-00000.done.json        per-shard stats; written last, so it doubles as the completion marker
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline import mirror, storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.schema import check_table

MANIFEST = "_manifest.json"
#: every stage's rejected records: the key, the stage, a short reason and the error text where one was raised
REJECT_SCHEMA = pa.schema(
    [("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("error", pa.string())]
)


def cache_root() -> Path:
    """Where generated worlds and pretrained toy models are cached: $SAFERCLIP_CACHE, else ~/.cache."""
    return Path(os.environ.get("SAFERCLIP_CACHE") or Path.home() / ".cache" / "saferclip-data")


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temp name beside ``path`` to write the file under; renamed onto ``path`` when the block ends, removed if
    it raises. Every file a run writes goes through here, so a crash never leaves a half file under a real name
    (and a stale temp file, ``.<name>.tmp-*``, is recognisable and cleaned by the next run); in the mirror of a
    work dir at a URL the finished file is then published (see :mod:`~saferclip_data.pipeline.mirror`). ``suffix``: for
    writers that append one of their own (``np.savez`` adds ``.npz``)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)  # a bucket's mirror may lack a folder a task made on its node
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    mirror.publish(path)  # in a work dir at a URL: uploaded under the final name once complete


def remove_tree(path: Path) -> None:
    """Delete a folder (or file) of the work dir: a stage's scratch once used, an attempt that starts over. In a
    work dir at a URL its objects go from the bucket too, so the bucket holds what a local work dir would."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    mirror.remove(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_npy(path: Path, array: np.ndarray) -> None:
    """One array as a .npy file (readable with ``np.load(..., mmap_mode="r")``)."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, array, allow_pickle=False)


def atomic_write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> None:
    """``row_group_size``: rows per group, for files read back a batch at a time (a reader holds one group)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size, **_encodings(table.schema))


def _encodings(schema: pa.Schema) -> dict[str, list[str]]:
    """Dictionary encoding and min/max statistics only for the columns they help: not for vectors (list types:
    every element would be a dictionary candidate and a statistic; for 8,192 rows of two 768-wide float16
    embeddings they made the write 2.8x and the read 3.5x slower) nor for encoded media (binary: unique blobs)."""

    def vector(t: pa.DataType) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    blob = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    scalar = [f.name for f in schema if not vector(f.type)]
    return {"use_dictionary": [n for n in scalar if not any(is_(schema.field(n).type) for is_ in blob)],
            "write_statistics": scalar}  # fmt: skip


def _with_metadata(table: pa.Table, metadata: dict[str, str]) -> pa.Table:
    if not metadata:
        return table
    merged = dict(table.schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in metadata.items()})
    return table.replace_schema_metadata(merged)


class WorkDir:
    """A work dir on local disk, or at a URL (``s3://bucket/runs/x``): then ``root`` is this process's local
    mirror of it and the bucket is the truth (:mod:`~saferclip_data.pipeline.mirror`)."""

    def __init__(self, root: str | Path):
        self.remote = storage.is_url(root)
        self.location = str(root).rstrip("/") if self.remote else str(root)
        self.root = mirror.register(self.location) if self.remote else Path(root)
        #: where a build takes the work dir's lock: in it, or for a bucket's, in this machine's scratch dir
        self.lock_folder = mirror.lock_folder(self.location) if self.remote else self.root

    # ---- stage level -------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> dict[str, Any] | None:
        data = mirror.refresh(self.stage_dir(stage) / MANIFEST)  # a bucket's: read again, other nodes write it
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            return None  # a torn manifest means the stage never finished: treat as absent

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.stage_dir(stage) / MANIFEST, json.dumps(manifest, indent=2).encode())

    def state(self, stage: str, fingerprint: str) -> str:
        """'done' (complete, same fingerprint), 'partial' (same fingerprint, unfinished), 'stale', or 'new'."""
        manifest = self.manifest(stage)
        if manifest is None:
            return "new" if not mirror.exists(self.stage_dir(stage)) else "stale"
        if manifest.get("fingerprint") != fingerprint:
            return "stale"
        return "done" if manifest.get("complete") else "partial"

    def reset_stage(self, stage: str) -> None:
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        mirror.remove(self.stage_dir(stage))

    def local(self, path: Path) -> Path:
        """``path`` (in this work dir), fetched into the mirror first when the work dir is at a URL."""
        if self.remote:
            mirror.fetch(path)
        return path

    def pull(self, stage: str, pattern: str = "**") -> None:
        """Every file of a stage's folder (matching ``pattern``) made local: for readers that open files by
        path, such as a global stage reading an upstream stage's side files. Nothing to do on local disk."""
        if self.remote:
            mirror.pull(self.stage_dir(stage), pattern)

    def pull_all(self) -> None:
        """Every file of the work dir made local (one listing; only what the mirror lacks is downloaded)."""
        if self.remote:
            mirror.pull(self.root)

    def publish(self, stage: str) -> None:
        """Upload what a stage wrote outside the atomic writes (spill files, indexes) to the bucket."""
        if self.remote:
            mirror.publish_folder(self.stage_dir(stage))

    def clean_temp_files(self, stage: str) -> int:
        """Remove the temporary files a killed run of the stage left anywhere in its folder (a tar being
        written in ``shards/quad/``, a spill file, a task's parquet): a resumed build must leave none behind."""
        removed = 0
        for tmp in self.stage_dir(stage).rglob(".*.tmp*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- shard level -------------------------------------------------------------------------------------
    def shard_path(self, stage: str, shard_id: str, kind: str = "parquet") -> Path:
        suffix = {"parquet": ".parquet", "rejects": ".rejects.parquet", "partial": ".partial.parquet",
                  "done": ".done.json"}[kind]  # fmt: skip
        return self.stage_dir(stage) / f"{shard_id}{suffix}"

    def shard_done(self, stage: str, shard_id: str) -> bool:
        return self.local(self.shard_path(stage, shard_id, "done")).is_file()

    def shard_stats(self, stage: str, shard_id: str) -> dict[str, Any] | None:
        path = self.local(self.shard_path(stage, shard_id, "done"))
        return json.loads(path.read_text()) if path.is_file() else None

    def completed_shards(self, stage: str) -> list[str]:
        manifest = self.manifest(stage)
        if manifest is None or not manifest.get("complete"):
            raise UserError(f"stage '{stage}' has not completed in {self.root}; run its build first")
        return list(manifest["shards"])

    def write_shard(
        self,
        stage: str,
        shard_id: str,
        table: pa.Table,
        rejects: pa.Table,
        stats: dict[str, Any],
        metadata: dict[str, str],
        partial: pa.Table | None = None,
    ) -> None:
        """Write a shard's output, rejects and partial outputs (kept records missing part of their output), then
        its marker. Order matters: the marker is the commit."""
        declared = self.declared_columns(stage)
        if declared is not None:
            check_table(stage, table, declared)
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(self.shard_path(stage, shard_id), _with_metadata(table, metadata))
        atomic_write_parquet(self.shard_path(stage, shard_id, "rejects"), rejects)
        if partial is not None:
            atomic_write_parquet(self.shard_path(stage, shard_id, "partial"), partial)
        else:
            remove_tree(self.shard_path(stage, shard_id, "partial"))  # an earlier run's, now mended
        marker = {**stats, "written_at": time.time()}  # wall clock (unix seconds) once the output is on disk
        atomic_write_bytes(self.shard_path(stage, shard_id, "done"), json.dumps(marker, indent=2).encode())

    def declared_columns(self, stage: str) -> dict[str, str] | None:
        """The stage's declared output columns (name -> type pattern) from its manifest, read again only when the
        manifest changes (a process writes many shards)."""
        path = self.stage_dir(stage) / MANIFEST
        if self.remote and not path.is_file():
            self.manifest(stage)  # a worker on another node: its mirror has not seen the stage yet
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        cache = self.__dict__.setdefault("_declared", {})
        if stage not in cache or cache[stage][0] != stamp:
            cache[stage] = (stamp, (self.manifest(stage) or {}).get("schema") if stamp else None)
        return cache[stage][1]

    def read_shard(self, stage: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        path = self.local(self.shard_path(stage, shard_id))
        if not path.is_file():
            raise UserError(f"missing output of stage '{stage}': {path}")
        return pq.read_table(path, columns=columns)

    def shard_columns(self, stage: str, shard_id: str) -> list[str]:
        """Column names of a finished shard, read from its parquet footer only."""
        path = self.local(self.shard_path(stage, shard_id))
        if not path.is_file():
            raise UserError(f"missing output of stage '{stage}': {path}")
        return pq.read_schema(path).names

    def read_aligned(self, shard_id: str, inputs: dict[str, tuple[str, ...]]) -> pa.Table:
        """Join the requested columns of several upstream stages for one shard on ``key``.

        Rows are those present in every input, in the order of the first input (list the most downstream
        stage first: it has already dropped what earlier stages rejected).
        """
        stages = list(inputs)
        first = stages[0]
        table = self.read_shard(first, shard_id, sorted({"key", *inputs[first]}))
        for other in stages[1:]:
            cols = [c for c in inputs[other] if c != "key" and c not in table.column_names]
            if not cols:
                continue
            extra = self.read_shard(other, shard_id, ["key", *cols])
            index = pc.index_in(table["key"], value_set=extra["key"])
            present = pc.is_valid(index)
            if not pc.all(present).as_py():
                table = table.filter(present)
                index = index.filter(present)
            for col in cols:
                table = table.append_column(col, extra[col].take(index))
        return table

    def read_stage_columns(self, stage: str, columns: list[str]) -> pa.Table:
        """All shards of a completed stage, selected columns only, in shard order."""
        shards = self.completed_shards(stage)
        tables = [self.read_shard(stage, s, columns) for s in shards]
        return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})

    def write_table(self, stage: str, name: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(folder / f"{name}.parquet", _with_metadata(table, metadata or {}))

    def write_task_log(self, stage: str, name: str, rows: list[dict[str, Any]]) -> None:
        """Bookkeeping of a stage's tasks (which process and node ran each, how long): ``_tasks-<name>.json``.
        It is kept out of the data files (which must be the same bytes whatever ran them), like the markers."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"_tasks-{name}.json", json.dumps(rows, indent=1).encode())

    def task_log(self, stage: str, name: str) -> list[dict[str, Any]]:
        path = self.local(self.stage_dir(stage) / f"_tasks-{name}.json")
        return json.loads(path.read_text()) if path.is_file() else []

    def partials(self, stage: str) -> pa.Table:
        """Kept records of a stage that lost part of their output (key, stage, reason, error)."""
        self.pull(stage, "*.partial.parquet")
        files = sorted(self.stage_dir(stage).glob("*.partial.parquet"))
        tables = [pq.read_table(f) for f in files]
        return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()

    def rejects(self, stage: str, shard_ids: list[str] | None = None) -> pa.Table:
        """Rejects of a stage: of the given (finished) shards, or all; plus a global stage's rejects table."""
        folder = self.stage_dir(stage)
        if shard_ids is None:
            self.pull(stage, "*rejects.parquet")
            files = sorted(folder.glob("*.rejects.parquet"))
        else:
            files = [self.local(self.shard_path(stage, s, "rejects")) for s in shard_ids]
        if self.local(folder / "rejects.parquet").is_file():
            files.append(folder / "rejects.parquet")
        tables = [pq.read_table(f) for f in files]
        return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
