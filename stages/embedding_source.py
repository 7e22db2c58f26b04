"""Sources of precomputed CLIP embeddings: select on vectors and metadata first, fetch images only for what is kept.

Two published layouts, rows aligned between the metadata and the vector files:

- ``clip-retrieval`` (LAION's ``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy``, ``metadata/metadata_N.parquet``):
  columns ``url``, ``caption``, optionally ``key``, ``punsafe`` (or LAION-5B's ``NSFW`` tag), ``similarity``.
- ``datacomp`` (``<shard>.parquet`` + ``<shard>.npz`` per shard): columns ``uid``, ``url``, ``text``; the npz holds
  one array per model (``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt``): the recipe names which.

A record keeps its URL (``url``), its label from ``punsafe`` (or ``NSFW``) where the metadata has one, and where
its vectors are (``embedding_part``, ``embedding_row``); the embed stage reads them from there instead of running
a model. The recipe's ``model:`` names the model that made them: its identity is recorded and its width checked
against the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.stage import BatchResult, Reject
from saferclip_data.stages import readers

EMBEDDING_COLUMNS = ("url", "embedding_part", "embedding_row")
_NUMBER = re.compile(r"(\d+)$")


class EmbeddingSourceOptions(BaseModel):
    """``source.embeddings``: the layout of a precomputed-embedding source (``source.kind: embeddings``)."""

    model_config = ConfigDict(extra="forbid")
    layout: Literal["clip-retrieval", "datacomp"] = Field(
        default="clip-retrieval", description="clip-retrieval (LAION: img_emb/, text_emb/, metadata/) or datacomp"
    )
    image_key: str = Field(default="l14_img", description="datacomp: the npz array of image embeddings")
    text_key: str = Field(default="l14_txt", description="datacomp: the npz array of text embeddings")
    punsafe_threshold: float = Field(default=0.5, ge=0, le=1, description="punsafe at or above = unsafe")


@dataclass(frozen=True)
class EmbeddingPart:
    """One aligned (metadata, image vectors, text vectors) triple; vectors are ``path`` or ``path:npz-key``."""

    metadata: str
    image: str
    text: str
    rows: int

    def files(self) -> list[str]:
        return sorted({self.metadata, *(v.split("::")[0] for v in (self.image, self.text))})


def _number(path: str) -> int:
    match = _NUMBER.search(PurePosixPath(storage.name(path)).stem)
    return int(match.group(1)) if match else -1


def _row_count(path: str) -> int:
    """Rows of a parquet file, from its footer only (a range read at a URL)."""
    if not storage.is_url(path):
        return pq.ParquetFile(path).metadata.num_rows
    with storage.open_file(path) as file:
        return pq.ParquetFile(file).metadata.num_rows


def find_parts(folder: str, options: EmbeddingSourceOptions) -> list[EmbeddingPart]:
    """The folder's parts in order (a local folder or a URL prefix); raises ValueError naming what is missing."""
    parts = []
    if options.layout == "clip-retrieval":
        metadata = sorted(storage.list_files(storage.join(folder, "metadata"), "metadata_*.parquet"), key=_number)
        if not metadata:
            raise ValueError(f"no metadata/metadata_N.parquet in {folder} (clip-retrieval layout)")
        for meta in metadata:
            n = _number(meta)
            image, text = f"img_emb/img_emb_{n}.npy", f"text_emb/text_emb_{n}.npy"
            found = storage.existing_files([storage.join(folder, image), storage.join(folder, text)])
            for relative in (image, text):
                if storage.join(folder, relative) not in found:
                    raise ValueError(f"{storage.name(meta)} has no matching {relative} in {folder}")
            parts.append(EmbeddingPart(meta, storage.join(folder, image), storage.join(folder, text), _row_count(meta)))
    else:
        files = storage.list_files(folder)
        for meta in [f for f in files if f.endswith(".parquet")]:
            npz = meta.removesuffix(".parquet") + ".npz"
            if npz not in files:
                missing = storage.name(npz)
                raise ValueError(f"{storage.name(meta)} has no matching {missing} in {folder} (datacomp layout)")
            parts.append(EmbeddingPart(meta, f"{npz}::{options.image_key}", f"{npz}::{options.text_key}",
                                       _row_count(meta)))  # fmt: skip
        if not parts:
            raise ValueError(f"no <shard>.parquet + <shard>.npz pairs in {folder} (datacomp layout)")
    return parts


def vector_width(part: EmbeddingPart) -> tuple[int, int]:
    """(image width, text width) of a part's vector files, reading only their headers where possible."""
    return tuple(int(_vectors(ref).shape[1]) for ref in (part.image, part.text))  # type: ignore[return-value]


@lru_cache(maxsize=4)
def _vectors(ref: str) -> Any:
    """A part's vectors: a memory-mapped .npy (at a URL: rows read by byte range), or one array of an .npz
    (loaded: npz members cannot be mapped)."""
    path, _, key = ref.partition("::")
    if not key:
        return storage.npy_rows(path)
    with storage.open_file(path) as file, np.load(file) as archive:
        if key not in archive.files:
            raise ValueError(f"{storage.name(path)} has no array '{key}' (has: {', '.join(archive.files)})")
        return archive[key]


def read_vectors(part: EmbeddingPart, kind: str, rows: np.ndarray) -> np.ndarray:
    """float32 rows of a part's ``image`` or ``text`` vectors."""
    return np.asarray(_vectors(part.image if kind == "image" else part.text)[rows], np.float32)


def _metadata_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows start..stop of a parquet file, reading only the row groups that hold them."""
    if not storage.is_url(path):
        return _row_range(pq.ParquetFile(path), start, stop)
    with storage.open_file(path) as handle:
        return _row_range(pq.ParquetFile(handle), start, stop)


def _row_range(file: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    groups, first, offset = [], None, 0
    for g in range(file.num_row_groups):
        n = file.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = file.read_row_groups(groups) if groups else file.schema_arrow.empty_table()
    return table.slice(start - (first or 0), stop - start)


def records(part: EmbeddingPart, index: int, start: int, stop: int, options: EmbeddingSourceOptions,
            split: str | None) -> pa.Table:  # fmt: skip
    """Source records of rows start..stop of one part (the source stage's uniform columns plus url and where
    the vectors are); no image bytes: URLs are fetched later, for the selected records only."""
    table = _metadata_rows(part.metadata, start, stop)
    n = table.num_rows

    def column(*names: str) -> list:
        for name in names:
            if name in table.column_names:
                return table[name].cast(pa.string()).to_pylist()
        return [None] * n

    stem = readers.sanitize_key(PurePosixPath(storage.name(part.metadata)).stem)
    keys = [readers.sanitize_key(k) if k else f"{stem}_{start + i:09d}" for i, k in enumerate(column("key", "uid"))]
    if "punsafe" in table.column_names:
        punsafe = table["punsafe"].cast(pa.float64()).to_pylist()
        label = [None if p is None else ("unsafe" if p >= options.punsafe_threshold else "safe") for p in punsafe]
    elif "NSFW" in table.column_names:
        label = [None if v is None else ("unsafe" if v == "NSFW" else "safe") for v in column("NSFW")]
    else:
        label = column("label")
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(column("caption", "text"), pa.string()),
        "image": pa.nulls(n, pa.binary()),
        "group": pa.array(keys, pa.string()),
        "label": pa.array(label, pa.string()),
        "category": pa.array(column("category"), pa.string()),
        "_reason": pa.nulls(n, pa.string()),
        "_error": pa.nulls(n, pa.string()),
        "url": pa.array(column("url"), pa.string()),
        "embedding_part": pa.array([index] * n, pa.int32()),
        "embedding_row": pa.array(np.arange(start, stop, dtype=np.int64)),
        "split": pa.array(column("split") if "split" in table.column_names else [split] * n, pa.string()),
    })  # fmt: skip


def to_fixed_list(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """float16 rows as an Arrow fixed-size list; rows with ``valid`` False become nulls."""
    dim = vectors.shape[1]
    values = pa.array(vectors.astype(np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def model_identity(model_cfg: Any) -> tuple[str, int]:
    """(identity, embedding width) of the recipe's model: loaded once, on the CPU, then dropped."""
    from saferclip_data.models.clip import load_recipe_clip

    loaded = load_recipe_clip(model_cfg.arch, model_cfg.pretrained, init_seed=model_cfg.init_seed,
                       cache_dir=model_cfg.cache_dir)  # fmt: skip
    return loaded.identity, loaded.embed_dim


def precomputed_batch(batch: pa.Table, parts: list, dim: int) -> BatchResult:
    """The batch's vectors from its parts' files, L2-normalised; a record whose vector is zero or not finite is
    rejected with the reason (it cannot be searched or scored)."""
    part_of = np.asarray(batch["embedding_part"].to_numpy(zero_copy_only=False), np.int64)
    row_of = np.asarray(batch["embedding_row"].to_numpy(zero_copy_only=False), np.int64)
    has_caption = np.asarray(batch["caption"].is_valid().to_numpy(zero_copy_only=False), bool)
    vectors = {}
    for kind in ("image", "text"):
        out = np.zeros((len(part_of), dim), np.float32)
        for part in np.unique(part_of):
            at = part_of == part
            out[at] = read_vectors(parts[part], kind, row_of[at])
        norms = np.linalg.norm(out, axis=1)
        good = np.isfinite(norms) & (norms > 0)
        vectors[kind] = (np.divide(out, np.where(good, norms, 1)[:, None]), good)
    keys = batch["key"].to_pylist()
    bad = ~(vectors["image"][1] & vectors["text"][1])
    rejects = [Reject(keys[i], "invalid embedding", "a precomputed vector is zero or not finite")
               for i in np.flatnonzero(bad)]  # fmt: skip
    keep = ~bad
    table = pa.table({
        "key": batch["key"].filter(pa.array(keep)),
        "image_embedding": to_fixed_list(vectors["image"][0][keep], np.ones(int(keep.sum()), bool)),
        "text_embedding": to_fixed_list(vectors["text"][0][keep], has_caption[keep]),
    })  # fmt: skip
    return BatchResult(table, rejects)
