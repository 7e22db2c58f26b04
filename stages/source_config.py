"""The recipe's ``source:`` section: where records come from and how they are read, fetched and derived."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from braceexpand import braceexpand
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.errors import UserError, missing_extra
from saferclip_data.pipeline.recipe import resolve_path
from saferclip_data.pipeline.registry import Registry
from saferclip_data.pipeline.stage import StageConfig
from saferclip_data.stages import layouts, readers
from saferclip_data.stages.blocklist import load_blocklist
from saferclip_data.stages.caption_edit import CaptionEditOptions
from saferclip_data.stages.download import DownloadOptions
from saferclip_data.stages.embedding_source import EMBEDDING_COLUMNS, EmbeddingSourceOptions, find_parts
from saferclip_data.stages.layouts import COCO_URL

OUTPUT_COLUMNS = ("key", "caption", "image", "group", "label", "category")
#: generated sources (``source.kind: toy``: the toy world), from their packages' entry points: an object with
#: ``columns()`` (the ground-truth columns it adds), ``fingerprint(options)`` and ``shards(options, folder, cache)``
#: (the folder of its WebDataset tars, generated once)
GENERATED_SOURCES: Registry = Registry("generated source kind", "saferclip_data.source_kinds")


class ToyWorldOptions(BaseModel):
    """Size and seed of a generated toy world (``source.kind: toy``)."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    scenes: int = Field(default=3000, gt=0, description="safe scenes over train/val/test, each with an unsafe edit")
    shifted_scenes: int = Field(default=400, ge=0, description="scenes of the shifted split (the benchmark's)")
    shift: Literal["combinations", "places"] = Field(
        default="combinations",
        description="combinations: objects at places where training never shows them (familiar words); places: "
        "two places never seen at all",
    )
    noisy_pair_fraction: float = Field(default=0.4, ge=0, le=1, description="ViSU-like wrong paired_safe share")
    image_size: int = Field(default=64, ge=16)
    shard_size: int = Field(default=1000, gt=0)


Layout = Literal["plain", "visu", "nsfwcaps", "laion"]


class SourcePart(BaseModel):
    """One table of a multi-part source (``source.parts``): a file or a hub data set, in its layout, as a split.
    A recipe can so train on ViSU-Text and draw its benchmark from NSFW-Caps."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(default=None, description="manifest file (parquet, jsonl, csv)")
    hub_dataset: str | None = Field(default=None, description="or a Hugging Face data set id")
    hub_split: str | None = Field(default=None, description="its split (default train)")
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    layout: Layout = "plain"
    split: str | None = Field(default=None, description="split name for its records (if the table has none)")
    coco_root: str | None = None
    coco_url: str | None = None

    _paths = field_validator("path", "coco_root")(resolve_path)

    @model_validator(mode="after")
    def _check(self):
        if (self.path is None) == (self.hub_dataset is None):
            raise ValueError("source.parts: give each part either path or hub_dataset")
        if self.path is not None:
            if not storage.is_file(self.path):
                raise ValueError(f"source.parts: manifest file not found: {self.path}")
            if not readers.manifest_format(self.path, self.format):
                raise ValueError(f"source.parts: cannot tell the format of {storage.name(self.path)}; set format")
        if self.coco_root is not None and not Path(self.coco_root).is_dir():
            raise ValueError(f"source.parts: coco_root folder not found: {self.coco_root}")
        return self


class SourceConfig(StageConfig):
    """The recipe's top-level ``source:`` section."""

    kind: Literal["manifest", "image_folder", "webdataset", "toy", "hub", "embeddings"] = Field(
        description="layout of the source (embeddings: precomputed CLIP vectors, see source.embeddings)"
    )
    path: str | None = Field(
        default=None,
        description="manifest file, image folder, or tar file / folder / {00..09} pattern; "
        "for kind embeddings: the folder of parts; for kind toy: where to write the world (default: the cache)",
    )
    toy: ToyWorldOptions = Field(default_factory=lambda: ToyWorldOptions(), description="kind toy: the world")
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    key_column: str = "key"
    caption_column: str = "caption"
    image_column: str = Field(default="image", description="path, URL or bytes of the image")
    group_column: str = "group"
    label_column: str = "label"
    category_column: str = "category"
    extra_columns: list[str] = Field(default_factory=list, description="further columns carried through")
    image_root: str | None = Field(
        default=None, description="base of relative image paths (default: manifest's folder)"
    )
    shard_size: int = Field(default=1000, gt=0, description="records per shard (manifests, image folders)")
    require_image: bool | None = Field(
        default=None, description="default: true, but false for the visu and nsfwcaps layouts (text-only unsafe)"
    )
    require_caption: bool = True
    blocklist: str | None = Field(
        default=None, description="file of image-byte digests (sha256 or md5, one per line) to reject at ingestion"
    )
    url_timeout: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=256, gt=0, le=1 << 24)
    layout: Literal["plain", "visu", "nsfwcaps", "laion"] | None = Field(
        default=None, description="kind manifest/hub: a published layout (visu, nsfwcaps, laion); default plain"
    )
    split: str | None = Field(default=None, description="split name given to records whose file has none")
    coco_root: str | None = Field(default=None, description="layout visu: local COCO image folder")
    coco_url: str | None = Field(default=None, description=f"layout visu: image URL template, e.g. {COCO_URL}")
    punsafe_threshold: float | None = Field(
        default=None, ge=0, le=1, description="layout laion: punsafe >= this is unsafe (default 0.5)"
    )
    hub_dataset: str | None = Field(default=None, description="kind hub: a Hugging Face data set id (datasets extra)")
    hub_split: str | None = Field(default=None, description="kind hub: which split to load (default train)")
    download: DownloadOptions | None = Field(
        default=None, description="fetch http(s) images with img2dataset first (retried on later builds)"
    )

    parts: list[SourcePart] | None = Field(
        default=None, min_length=1, description="kind manifest/hub: several tables, each in its layout and split"
    )
    embeddings: EmbeddingSourceOptions | None = Field(
        default=None, description="kind embeddings: the layout (clip-retrieval or datacomp) and which arrays to read"
    )
    caption_edit: CaptionEditOptions | None = Field(
        default=None, description="derive an LLM-edited twin of each safe (or unsafe) caption as a new record"
    )

    # download and caption_edit add their result-changing settings in SourceStage.input_fingerprint
    RUNTIME_FIELDS = StageConfig.RUNTIME_FIELDS | {"url_timeout", "download", "caption_edit"}

    _paths = field_validator("path", "image_root", "blocklist", "coco_root")(resolve_path)

    def table_parts(self) -> list[SourcePart]:
        """The tables a manifest or hub source reads: its parts, or the one its top-level fields describe."""
        if self.parts:
            return self.parts
        return [SourcePart.model_construct(path=self.path, hub_dataset=self.hub_dataset, hub_split=self.hub_split,
                                           format=self.format, layout=self.layout or "plain", split=self.split,
                                           coco_root=self.coco_root, coco_url=self.coco_url)]  # fmt: skip

    @model_validator(mode="after")
    def _check_path(self):
        for key, module, extra in (("download", "img2dataset", "download"), ("caption_edit", "openai", "llm")):
            problem = missing_extra(module, extra) if getattr(self, key) is not None else None
            if problem:
                raise ValueError(f"source.{key}: {problem}")
        if self.blocklist is not None:
            if not storage.is_file(self.blocklist):
                raise ValueError(f"source.blocklist: file not found: {self.blocklist}")
            try:
                load_blocklist(self.blocklist)  # a malformed line fails validation, before any work
            except UserError as exc:
                raise ValueError(str(exc)) from None
        clash = sorted(set(self.extra_columns) & set(OUTPUT_COLUMNS))
        if clash:
            raise ValueError(f"source.extra_columns: {', '.join(clash)} is always read; list only further columns")
        part_layouts = {p.layout for p in self.parts} if self.parts else {self.layout or "plain"}
        if self.kind == "embeddings":
            return self._check_embeddings()
        if self.require_image is None:
            self.require_image = not part_layouts & {"visu", "nsfwcaps"}
        if self.kind == "toy":
            if not self.extra_columns:
                self.extra_columns = list(GENERATED_SOURCES.get(self.kind).columns())
            return self
        if (self.split or any(p.split for p in self.parts or [])) and "split" not in self.extra_columns:
            self.extra_columns.append("split")
        if self.parts and self.kind not in ("manifest", "hub"):
            raise ValueError(f"source.parts: tables of a manifest or hub source, not of kind {self.kind}")
        for layout in sorted(part_layouts - {"plain"}):
            if self.kind not in ("manifest", "hub"):
                raise ValueError(f"source.layout: {layout} is a table layout; use kind manifest or hub")
            self.extra_columns += [c for c in layouts.EXTRA[layout] if c not in self.extra_columns]
        if self.parts:
            return self
        if self.layout == "visu" and self.coco_root and not Path(self.coco_root).is_dir():
            raise ValueError(f"source.coco_root: folder not found: {self.coco_root}")
        if self.kind == "hub":
            if not self.hub_dataset:
                raise ValueError("source.hub_dataset: required for kind hub (a Hugging Face data set id)")
            return self
        if self.path is None:
            raise ValueError(f"source.path: required for kind {self.kind}")
        if self.kind == "manifest":
            if not storage.is_file(self.path):
                raise ValueError(f"source.path: manifest file not found: {self.path}")
            if not readers.manifest_format(self.path, self.format):
                name = storage.name(self.path)
                raise ValueError(f"source.format: cannot tell the format of {name}; set parquet, jsonl or csv")
        elif self.kind == "image_folder":
            if not storage.is_dir(self.path):
                raise ValueError(f"source.path: image folder not found: {self.path}")
        elif not tar_files(self.path):
            raise ValueError(f"source.path: no .tar files match {self.path}")
        if self.image_root is not None and not storage.is_dir(self.image_root):
            raise ValueError(f"source.image_root: folder not found: {self.image_root}")
        if not (self.require_image or self.require_caption):
            raise ValueError("source: require_image and require_caption cannot both be false")
        return self

    def _check_embeddings(self):
        """A precomputed-embedding source: a folder of parts in its layout; images come later, by URL."""
        if self.embeddings is None:
            self.embeddings = EmbeddingSourceOptions()
        if self.require_image is None:
            self.require_image = False
        if self.require_image:
            raise ValueError("source.require_image: an embeddings source has no image bytes (URLs are fetched later)")
        if self.path is None or not storage.is_dir(self.path):
            raise ValueError(f"source.path: folder of embedding parts not found: {self.path}")
        try:
            find_parts(self.path, self.embeddings)
        except ValueError as exc:
            raise ValueError(f"source.path: {exc}") from None
        self.extra_columns += [c for c in (*EMBEDDING_COLUMNS, "split") if c not in self.extra_columns]
        return self


def tar_files(pattern: str) -> list[str]:
    """Tar shards named by a file, a folder of tars, a glob, or a brace pattern (``shard-{000..009}.tar``),
    local or at a URL (a prefix is listed once per folder, not asked a file at a time)."""
    if "{" not in pattern and not any(c in pattern for c in "*?[") and storage.is_dir(pattern):
        return storage.list_files(pattern, "*.tar")
    found: list[str] = []
    for expanded in braceexpand(pattern):
        found.extend(storage.glob(expanded) if any(c in expanded for c in "*?[") else [expanded])
    return storage.existing_files(found)
