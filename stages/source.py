"""The source stage: reads manifests, image folders or WebDataset shards into uniform record shards.

Every record leaves with a stable dot-free ``key``, a ``group`` (records of one quadruplet share it), its
caption and its image bytes (loaded from a path or URL when the source only names them). Records that cannot
be used go to the rejects table with a reason; they never stop the run.
"""

from __future__ import annotations

import hashlib
import urllib.request
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.schema import field_like
from saferclip_data.pipeline.stage import BatchResult, Reject, ShardSpec, Stage
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet, cache_root
from saferclip_data.stages import download, readers, source_tables
from saferclip_data.stages.blocklist import Blocklist, load_blocklist
from saferclip_data.stages.caption_edit import CaptionEditor, with_edit_rows
from saferclip_data.stages.columns import fields, schema
from saferclip_data.stages.download import is_url
from saferclip_data.stages.embedding_source import EmbeddingPart, find_parts
from saferclip_data.stages.embedding_source import records as embedding_records
from saferclip_data.stages.source_config import (
    GENERATED_SOURCES,
    OUTPUT_COLUMNS,
    SourceConfig,
    ToyWorldOptions,
    tar_files,
)

__all__ = ["OUTPUT_COLUMNS", "SourceConfig", "SourceStage", "ToyWorldOptions", "tar_files"]
UNSAFE_LABELS = frozenset({"unsafe", "nsfw", "1", "true", "yes"})  # label values that mark an unsafe record
#: where a manifest source keeps each shard's manifest rows (in its stage folder), written when planning
INPUT_DIR = "_input"


class SourceStage(Stage):
    name = "source"
    Config = SourceConfig
    config_section = "source"
    output_columns = OUTPUT_COLUMNS
    version = "1"

    config: SourceConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields("key", "caption", "image", "group", "label", "category"),
                      [field_like(name) for name in self.config.extra_columns])  # fmt: skip

    # ---- driver side -------------------------------------------------------------------------------------
    def generated_shards(self) -> list[str]:
        """A generated source's tar shards (the toy world: generated once, cached by its settings)."""
        c = self.config
        provider = GENERATED_SOURCES.get(c.kind)
        return tar_files(str(provider.shards(c.toy.model_dump(), Path(c.path) if c.path else None, cache_root())))

    @cached_property
    def embedding_parts(self) -> list[EmbeddingPart]:
        return find_parts(self.config.path, self.config.embeddings)

    def _files(self) -> list[str]:
        c = self.config
        if c.kind == "embeddings":
            return [f for part in self.embedding_parts for f in part.files()]
        if c.kind in ("hub", "manifest"):
            return [p.path for p in c.table_parts() if p.path]
        if c.kind == "webdataset":
            return tar_files(c.path)
        return [storage.join(c.path, rel) for rel in readers.list_image_folder(c.path)]

    def input_fingerprint(self, workdir: WorkDir) -> dict[str, Any]:
        """Sizes and modification times (an object's version tag) of the input files, and the blocklist's
        content: a change re-runs the source. With ``download``, also the download attempt that is due: failed
        URLs left to retry make the next build run the source again."""
        out: dict[str, Any] = {}
        if self.config.download:
            out["download"] = self.config.download.result_settings()
            out["download_attempt"] = download.wanted_attempt(
                self.download_dir(workdir), self.config.download, self.url_records
            )
        if self.config.caption_edit:
            out["caption_edit"] = self.config.caption_edit.result_settings()
        hub = [[p.hub_dataset, p.hub_split] for p in self.config.table_parts() if p.hub_dataset]
        if hub:
            out["hub"] = hub
        if self.config.blocklist:
            out["blocklist"] = hashlib.sha256(storage.read_bytes(self.config.blocklist)).hexdigest()
        if self.config.kind == "toy":
            return {
                **out,
                "toy_world": self.config.toy.model_dump(),
                "world_version": GENERATED_SOURCES.get("toy").fingerprint(self.config.toy.model_dump()),
            }
        out.update(storage.stamps(self._files()))
        return out

    @staticmethod
    def download_dir(workdir: WorkDir) -> Path:
        return workdir.root / "downloads"

    def url_records(self) -> dict[str, str]:
        """key -> URL of the manifest records whose image is an http(s) URL (what ``download`` fetches)."""
        if self.config.kind not in ("manifest", "hub"):
            return {}
        table = self.manifest_table
        if self.config.image_column not in table.column_names:
            return {}
        keys = self._keys(table, 0, table.num_rows)
        images = table[self.config.image_column].to_pylist()
        return {k: u for k, u in zip(keys, images) if is_url(u)}

    def fetch_images(self, workdir: WorkDir) -> None:
        """Run the download attempt that is due (see :mod:`stages.download`)."""
        folder = self.download_dir(workdir)
        urls = self.url_records()
        if download.wanted_attempt(folder, self.config.download, lambda: urls) > download.attempts_done(folder):
            pending = download.pending_urls(folder, urls)
            if pending:
                download.run_attempt(folder, pending, self.config.download, self.task_map)

    def plan_shards(self, workdir: WorkDir) -> list[ShardSpec]:
        c = self.config
        size = c.shard_size
        if c.download:
            self.fetch_images(workdir)
        if c.kind in ("webdataset", "toy"):
            files = self.generated_shards() if c.kind == "toy" else tar_files(c.path)
            specs = [ShardSpec(f"part-{i:05d}", {"file": f}) for i, f in enumerate(files)]
        elif c.kind == "embeddings":  # each part cut into shards of shard_size rows
            slices = [(i, start, min(start + size, part.rows)) for i, part in enumerate(self.embedding_parts)
                      for start in range(0, part.rows, size)]  # fmt: skip
            specs = [ShardSpec(f"part-{n:05d}", {"part": i, "start": a, "stop": b, "rows": b - a})
                     for n, (i, a, b) in enumerate(slices)]  # fmt: skip
        elif c.kind in ("manifest", "hub"):
            rows = self.manifest_table.num_rows
            specs = [
                ShardSpec(
                    f"part-{i:05d}",
                    {"start": start, "stop": min(start + size, rows), "rows": min(start + size, rows) - start},
                )
                for i, start in enumerate(range(0, rows, size))
            ]
            if workdir is not None:
                self._write_input_slices(workdir, specs)
        else:
            files = readers.list_image_folder(c.path)
            specs = [
                ShardSpec(
                    f"part-{i:05d}", {"files": files[start : start + size], "rows": len(files[start : start + size])}
                )
                for i, start in enumerate(range(0, len(files), size))
            ]
        if not specs:
            raise UserError(f"source: no records in {c.path or 'the generated ' + c.kind + ' source'}")
        return specs

    # ---- worker side -------------------------------------------------------------------------------------
    @cached_property
    def editor(self) -> CaptionEditor:
        o = self.config.caption_edit
        return CaptionEditor(o, Path(o.cache_dir) if o.cache_dir else cache_root() / "caption-edits")

    def _edit_captions(self, batch: pa.Table) -> dict[int, tuple[str | None, str | None]]:
        """Row -> (edited caption, failure reason) for the derived rows of this batch, asked concurrently."""
        if "_edit_of" not in batch.column_names:
            return {}
        edit_of = batch["_edit_of"].to_pylist()
        rows = [i for i, text in enumerate(edit_of) if text is not None]
        categories = batch["category"].to_pylist()
        answers = self.editor.edit_many([(edit_of[i], categories[i]) for i in rows]) if rows else []
        return dict(zip(rows, answers))

    @cached_property
    def blocklist(self) -> Blocklist | None:
        return load_blocklist(self.config.blocklist) if self.config.blocklist else None

    @cached_property
    def manifest_table(self) -> pa.Table:
        return source_tables.manifest_table(self.config)

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        table = self._read_raw(spec, workdir)
        return with_edit_rows(table, self.config.caption_edit, UNSAFE_LABELS) if self.config.caption_edit else table

    def _read_raw(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        c = self.config
        if c.kind in ("webdataset", "toy"):
            table, extras = readers.read_webdataset_tar(spec.payload["file"], c.extra_columns)
            for col, values in extras.items():
                table = table.append_column(col, pa.array(values, type=pa.string()))
            return table
        if c.kind == "image_folder":
            return readers.read_image_folder(c.path, spec.payload["files"])
        if c.kind == "embeddings":
            p = spec.payload
            part = self.embedding_parts[p["part"]]
            return embedding_records(part, p["part"], p["start"], p["stop"], c.embeddings, c.split)
        table = self._manifest_slice(self._manifest_rows(spec, workdir), spec.payload["start"], spec.payload["stop"])
        return download.attach(table, self.download_dir(workdir)) if c.download else table

    def _keys(self, part: pa.Table, start: int, stop: int) -> list[str]:
        """Record keys of manifest rows start..stop: the key column made dot-free, else file stem + row number."""
        c = self.config
        if c.key_column in part.column_names:  # a row without a key gets its row's name and is rejected
            keys = part[c.key_column].cast(pa.string()).to_pylist()
            stem = self._stem()
            return [readers.sanitize_key(k) if k not in (None, "") else f"{stem}_row{start + i:09d}"
                    for i, k in enumerate(keys)]  # fmt: skip
        return [f"{self._stem()}_{i:09d}" for i in range(start, stop)]

    def _stem(self) -> str:
        """The source's name in generated keys: its file's stem (or the hub data set id)."""
        c = self.config
        return readers.sanitize_key(PurePosixPath(storage.name(c.path)).stem if c.path else c.hub_dataset or "hub")

    def _write_input_slices(self, workdir: WorkDir, specs: list[ShardSpec]) -> None:
        """Each shard's manifest rows as a parquet file in the stage's folder, written once by the driver, so a
        worker reads its own rows and never loads the whole manifest (10⁷ rows of captions and URLs are
        gigabytes, and every Ray actor would hold them)."""
        (workdir.stage_dir(self.name) / INPUT_DIR).mkdir(parents=True, exist_ok=True)
        for spec in specs:
            spec.payload["input"] = f"{INPUT_DIR}/{spec.shard_id}.parquet"
            start, stop = spec.payload["start"], spec.payload["stop"]
            atomic_write_parquet(workdir.stage_dir(self.name) / spec.payload["input"],
                                 self.manifest_table.slice(start, stop - start))  # fmt: skip

    def _manifest_rows(self, spec: ShardSpec, workdir: WorkDir | None) -> pa.Table:
        """This shard's manifest rows: the slice the driver wrote when it planned the shards, else (work dirs
        planned before slices existed, or no work dir) from the whole manifest."""
        name = spec.payload.get("input")
        if name and workdir is not None and (workdir.stage_dir(self.name) / name).is_file():
            return pq.read_table(workdir.stage_dir(self.name) / name)
        start, stop = spec.payload["start"], spec.payload["stop"]
        return self.manifest_table.slice(start, stop - start)

    def _manifest_slice(self, part: pa.Table, start: int, stop: int) -> pa.Table:
        c = self.config
        n = part.num_rows

        def column(name: str, as_string: bool = True) -> pa.Array:
            if name not in part.column_names:
                return pa.nulls(n, pa.string())
            col = part[name].combine_chunks()
            return col.cast(pa.string()) if as_string and not pa.types.is_string(col.type) else col

        keys = self._keys(part, start, stop)
        groups = column(c.group_column).to_pylist()
        image = column(c.image_column, as_string=False)
        if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
            image = image.cast(pa.string())
        columns = {
            "key": pa.array(keys, pa.string()),
            "caption": column(c.caption_column),
            "image": image,
            "group": pa.array([g if g is not None else k for g, k in zip(groups, keys)], pa.string()),
            "label": column(c.label_column),
            "category": column(c.category_column),
            "_reason": pa.nulls(n, pa.string()),
            "_error": pa.nulls(n, pa.string()),
        }
        if c.key_column in part.column_names:
            missing = pc.fill_null(pc.equal(part[c.key_column].cast(pa.string()), ""), True).combine_chunks()
            if pc.any(missing).as_py():
                columns["_reason"] = pc.if_else(missing, "missing key", columns["_reason"])
                columns["_error"] = pc.if_else(missing, f"column {c.key_column} is empty", columns["_error"])
        if readers.UNDECODABLE in part.column_names:  # text that is not UTF-8: the record is rejected, with where
            problem = part[readers.UNDECODABLE].combine_chunks()
            columns["_reason"] = pc.if_else(pc.is_valid(problem), "undecodable text", columns["_reason"])
            columns["_error"] = problem
        for extra in c.extra_columns:
            columns[extra] = part[extra].combine_chunks()
        return pa.table(columns)

    def _load_image(self, ref: Any) -> bytes:
        """Image bytes from bytes, a URL, or a path (relative paths resolve against image_root, else the
        manifest's folder, which may be a URL prefix)."""
        if isinstance(ref, bytes):
            return ref
        ref = str(ref)
        if ref.startswith(("http://", "https://", "file://")):
            with urllib.request.urlopen(ref, timeout=self.config.url_timeout) as response:
                return response.read()
        if storage.is_url(ref):
            return storage.read_bytes(ref, strict=False)
        if not Path(ref).is_absolute():
            ref = storage.join(self.config.image_root or storage.parent(self.config.path), ref)
        return storage.read_bytes(ref, strict=False)

    def process_batch(self, batch: pa.Table) -> BatchResult:
        """Load image bytes, check required fields; every row is kept or rejected with a reason."""
        c = self.config
        keep: list[int] = []
        images: list[bytes | None] = []
        rejects: list[Reject] = []
        fetched = batch["_fetched"].to_pylist() if "_fetched" in batch.column_names else [None] * batch.num_rows
        edits = self._edit_captions(batch)
        captions_in = batch["caption"].to_pylist()
        rows = batch.select(["key", "caption", "image", "_reason", "_error"]).to_pylist()
        for i, row in enumerate(rows):
            key = row["key"]
            if row["_reason"]:
                rejects.append(Reject(key, row["_reason"], row["_error"] or ""))
                continue
            if i in edits:  # a derived record: its caption is the LLM's edit, it has no image of its own
                answer, why = edits[i]
                if answer is None:
                    rejects.append(Reject(key, "caption edit failed", why or ""))
                else:
                    captions_in[i] = answer
                    keep.append(i)
                    images.append(None)
                continue
            caption = (row["caption"] or "").strip()
            if c.require_caption and not caption:
                rejects.append(Reject(key, "missing caption", "caption is empty"))
                continue
            image = fetched[i]
            if image is None and row["image"] not in (None, b"", ""):
                try:
                    image = self._load_image(row["image"])
                except (OSError, ValueError) as exc:
                    rejects.append(Reject(key, "image not readable", f"{row['image']!s:.200}: {exc}"))
                    continue
            if c.require_image and not image:
                rejects.append(Reject(key, "missing image", "no image path, URL or bytes"))
                continue
            blocked = self.blocklist.match(image) if image and self.blocklist else None
            if blocked:
                rejects.append(Reject(key, "blocklisted", f"{blocked} in {c.blocklist}"))
                continue
            keep.append(i)
            images.append(image)
        kept = batch.take(pa.array(keep, pa.int64()))
        if edits:
            kept = kept.set_column(kept.schema.get_field_index("caption"), "caption",
                                   pa.array([captions_in[i] for i in keep], pa.string()))  # fmt: skip
        captions = pc.utf8_trim_whitespace(kept["caption"]) if kept.num_rows else kept["caption"]
        columns = {
            "key": kept["key"],
            "caption": pc.if_else(pc.equal(captions, ""), None, captions) if kept.num_rows else captions,
            "image": pa.array(images, pa.binary()),
            "group": kept["group"],
            "label": kept["label"],
            "category": kept["category"],
        }
        for extra in c.extra_columns:
            columns[extra] = kept[extra]
        return BatchResult(pa.table(columns), rejects)

    def finalize(self, workdir: WorkDir, shard_ids: list[str]) -> None:
        """Keys must be unique over the whole source; a clash is the user's to fix, so fail clearly."""
        keys = pa.concat_arrays([workdir.read_shard(self.name, s, ["key"])["key"].combine_chunks() for s in shard_ids])
        counts = pc.value_counts(keys)
        dupes = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dupes):
            example = dupes[0]["values"].as_py()
            raise UserError(
                f"source: {len(dupes)} keys occur more than once after making them dot-free "
                f"(e.g. '{example}'); give every record a unique key"
            )
