"""The embed stage: open_clip image and text embeddings, L2-normalised, stored as float16.

The model is loaded once per worker (``setup``), on the worker's own device: CUDA with bf16 where the worker
has a GPU, the CPU in fp32 otherwise. Images travel as encoded bytes and are decoded here: on the GPU with
nvJPEG (torchvision ``decode_jpeg(device='cuda')``) when CUDA is present, with PIL otherwise. The model
identity (architecture + weights hash) goes into every output file and the stage manifest.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from saferclip_data.models.clip import CompileMode, encode_text, trim_tokens
from saferclip_data.models.decode import (
    byte_views,
    decode_pil,
    decode_tensors,
    normalization,
    tensor_path_mismatch,
)
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.recipe import resolve_path
from saferclip_data.pipeline.stage import BatchResult, Reject, Stage, StageConfig
from saferclip_data.stages.columns import fields, schema
from saferclip_data.stages.embedding_source import model_identity, precomputed_batch, to_fixed_list

log = logging.getLogger(__name__)


class ModelConfig(BaseModel):
    """The recipe's top-level ``model:`` section: the one embedding model of the recipe."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    arch: str = Field(
        description="open_clip architecture (ViT-B-32, ViT-L-14, toy-vit-tiny), hf-hub:org/repo or local-dir:/path"
    )
    pretrained: str | None = Field(default=None, description="pretrained tag, checkpoint path, or null: random init")
    init_seed: int = Field(default=0, description="seed of the random init when pretrained is null")
    cache_dir: str | None = Field(default=None, description="where open_clip keeps downloaded weights")
    _cache_dir = field_validator("cache_dir")(resolve_path)

    @field_validator("pretrained")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        from saferclip_data.models.clip import weight_source_kind

        if value and weight_source_kind("x", value) == "file":
            path = Path(value).expanduser()
            base = (info.context or {}).get("base_dir")
            if not path.is_absolute() and base is not None:
                path = Path(base) / path
            if not path.is_file():
                raise ValueError(f"checkpoint file not found: {path}")
            return str(path)
        return value

    @model_validator(mode="after")
    def _check_known(self):
        from saferclip_data.models.clip import WEIGHTS, known_architectures, pretrained_tags, weight_source_kind

        kind = weight_source_kind(self.arch, self.pretrained)
        if kind in ("hub", "local-dir"):
            return self
        provider = WEIGHTS.find(self.pretrained)
        if provider is not None:
            problem = provider.check(self.arch)
            if problem:
                raise ValueError(f"model.pretrained: {problem}")
            return self
        if self.arch not in known_architectures():
            raise ValueError(f"model.arch: unknown open_clip architecture '{self.arch}'")
        if kind == "file":
            check_checkpoint(Path(self.pretrained), self.arch)
        if kind == "tag" and self.pretrained not in pretrained_tags(self.arch):
            tags = ", ".join(pretrained_tags(self.arch)) or "none"
            raise ValueError(f"model.pretrained: unknown tag '{self.pretrained}' for {self.arch} (known: {tags})")
        return self


def check_checkpoint(path: Path, arch: str) -> None:
    """Open a checkpoint file as weights only (no code runs: a pickle that would execute something is refused)
    and check that it fits ``arch`` by its embedding width, without building the model: ``validate`` catches
    an unreadable or mismatched file before a build spends minutes getting there."""
    import torch

    from saferclip_data.models.clip import model_config

    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # mmap needs the zip format; an older file is read whole
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file; each is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"model.pretrained: {path} is not a readable weights file ({type(exc).__name__}: {first})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"model.pretrained: {path} holds no tensors (expected an open_clip state dict)")
    config = model_config(arch)
    projection = next((v for k, v in state.items() if k.removeprefix("module.") == "text_projection"), None)
    width = config.get("embed_dim")
    if projection is not None and width is not None and projection.shape[-1] != width:
        raise ValueError(f"model.pretrained: {path} embeds {projection.shape[-1]}-d, but model.arch {arch} "
                         f"embeds {width}-d: the checkpoint is of another architecture")  # fmt: skip


def image_encoder(model: Any, compile_mode: str | None) -> Callable:
    """The model's image tower as called per batch: eager, or compiled for one fixed shape (``dynamic=False``:
    the stage pads every batch to the batch size), the same way for the stage and for the bench's ceiling."""
    if compile_mode is None:
        return model.encode_image
    import torch

    return torch.compile(model.encode_image, mode=compile_mode, dynamic=False)


class EmbedConfig(StageConfig):
    batch_size: int | None = Field(
        default=None, gt=0, le=1 << 24, description="records per batch; unset: 512 on CUDA, 64 on CPU"
    )
    gpus: float | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = CUDA where the worker has it")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto = bf16 on CUDA, fp32 on CPU"
    )
    compile: CompileMode | None = Field(
        default=None,
        description="torch.compile the image tower with this mode (reduce-overhead adds CUDA graphs); compiled "
        "once per worker (about a minute for ViT-L/14), every batch padded to the batch size so one graph serves; "
        "unset = eager",
    )
    decoder: Literal["pil", "tensor"] | None = Field(
        default=None,
        description="pil = the model's own preprocessing per image; tensor = batched decode (nvJPEG on CUDA), "
        "resize and crop as tensor ops on the device; unset = tensor on CUDA where the model's preprocessing "
        "is the standard resize + centre crop, else pil",
    )


def load_worker_model(model_cfg: ModelConfig, device: str, precision: str, stage: str):
    """The recipe's model on this worker's own device: CUDA (bf16) where the worker has it, else CPU (fp32).

    Returns (LoadedClip, model in eval mode on the device, device name, torch dtype)."""
    import torch

    from saferclip_data.models.clip import load_recipe_clip

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise RuntimeError(f"stages.{stage}.device is 'cuda' but this worker has no CUDA device")
    device = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loaded = load_recipe_clip(
        model_cfg.arch, model_cfg.pretrained, init_seed=model_cfg.init_seed, cache_dir=model_cfg.cache_dir
    )
    model = loaded.model.to(device, dtype=dtype).eval()
    log.info("%s worker: %s on %s (%s)", stage, loaded.identity, device, precision)
    return loaded, model, device, dtype


#: where ``prepare`` leaves the identity of the model that made precomputed embeddings, for the workers
PRECOMPUTED = "_precomputed_model"


class EmbedStage(Stage):
    name = "embed"
    Config = EmbedConfig
    inputs = {"source": ("key", "caption", "image")}
    output_columns = ("key", "image_embedding", "text_embedding")
    recipe_sections = ("model",)
    version = "1"

    config: EmbedConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields("key", "{e}_embedding"))

    def __init__(self, config: StageConfig, sections: dict[str, Any]):
        super().__init__(config, sections)
        source = sections.get("source")
        #: an embeddings source: vectors are read from its files (no model runs, no prefetch thread)
        self.precomputed = getattr(source, "kind", None) == "embeddings"
        if self.precomputed:
            self.prefetch = False
            self.inputs = {"source": ("key", "caption", "embedding_part", "embedding_row")}

    def prepare(self, progress, workdir) -> None:
        """On the driver, before any worker starts: make weights the recipe names by tag (the toy world's tiny CLIP,
        pretrained once), so that workers only load a cached checkpoint (and the user sees the progress). For
        precomputed embeddings: load the model the recipe says made them, once, for its identity, and check its
        width."""
        from saferclip_data.models.clip import WEIGHTS

        model_cfg: ModelConfig = self.sections["model"]
        if self.precomputed:
            self._prepare_precomputed(model_cfg)
            return
        provider = WEIGHTS.find(model_cfg.pretrained)
        steps = provider.pending_steps(model_cfg.arch, model_cfg.init_seed) if provider is not None else 0
        if steps:
            advance = progress.subtask(f"pretrain {model_cfg.pretrained} CLIP", steps)
            provider.resolve(model_cfg.arch, model_cfg.init_seed, on_step=advance)

    def _prepare_precomputed(self, model_cfg: ModelConfig) -> None:
        from saferclip_data.stages.embedding_source import find_parts, vector_width

        source = self.sections["source"]
        # the model is loaded for its identity in a task (on a Ray worker when the build runs on Ray), so the
        # driver does not keep its weights
        identity, dim = self.task_map(model_identity, [(model_cfg,)], 1.0)[0]
        for part in find_parts(source.path, source.embeddings):
            widths = vector_width(part)
            if set(widths) != {dim}:
                raise UserError(
                    f"source.path: {Path(part.metadata).name}'s vectors are {'/'.join(map(str, widths))}-d but "
                    f"model {model_cfg.arch} embeds {dim}-d: name the model that made them in model:"
                )
        self.sections[PRECOMPUTED] = {"model_identity": identity, "embed_dim": str(dim)}

    def setup(self) -> None:
        import torch

        if self.precomputed:
            from saferclip_data.stages.embedding_source import find_parts

            source = self.sections["source"]
            self.parts = find_parts(source.path, source.embeddings)
            return
        self.clip, self.model, self.device, self.dtype = load_worker_model(
            self.sections["model"], self.config.device, self.config.precision, "embed"
        )
        mismatch = tensor_path_mismatch(self.clip.preprocess, self.clip.image_size)
        if self.config.decoder == "tensor" and mismatch:
            raise UserError(f"stages.embed.decoder: 'tensor' cannot reproduce this model's preprocessing: {mismatch}")
        wants_tensor = self.config.decoder == "tensor" or (self.config.decoder is None and self.device == "cuda")
        self.decoder = "tensor" if wants_tensor and not mismatch else "pil"
        if mismatch and self.config.decoder is None and self.device == "cuda":
            log.info("embed: decoding with PIL on the CPU: %s", mismatch)
        self.mean = self.std = None
        if self.decoder == "tensor":
            self.mean, self.std = normalization(self.clip.preprocess, self.device)
        #: the side stream prepare_batch decodes and uploads on, so that it overlaps the encoders (CUDA only)
        self._stream = torch.cuda.Stream() if self.device == "cuda" else None
        self._encode_image = image_encoder(self.model, self.config.compile)
        if self.config.compile:
            size = self.clip.image_size  # compile now, in the worker's set-up, not inside the first shard
            with torch.inference_mode():
                self._image_features(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype))

    def batch_rows(self) -> int:
        if self.precomputed:
            return self.config.batch_size or 65_536
        return self.config.batch_size or (512 if self.device == "cuda" else 64)

    def output_metadata(self) -> dict[str, str]:
        if self.precomputed:
            return dict(self.sections[PRECOMPUTED])
        return {"model_identity": self.clip.identity, "embed_dim": str(self.clip.embed_dim)}

    def process_batch(self, batch: pa.Table) -> BatchResult:
        if not self.precomputed:
            return super().process_batch(batch)
        return precomputed_batch(batch, self.parts, int(self.sections[PRECOMPUTED]["embed_dim"]))

    # ---- the batch function, in two halves (the worker prepares the next batch while this one computes) -------
    prefetch = True

    def prepare_batch(self, batch: pa.Table) -> PreparedBatch:
        """Decode the images and tokenise the captions; on CUDA, on a side stream so the copies and the nvJPEG
        work overlap the previous batch's encoders."""
        import torch

        blobs = byte_views(batch["image"])
        captions = batch["caption"].to_pylist()
        image_rows = [i for i, b in enumerate(blobs) if b is not None]
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if self.decoder == "pil":
                pixels, ok, failed = decode_pil([blobs[i] for i in image_rows], self.clip.preprocess)
            else:
                pixels, ok, failed = decode_tensors(
                    [blobs[i] for i in image_rows], self.clip.image_size, self.mean, self.std, self.device
                )
            failed_rows = {image_rows[j] for j, _ in failed}
            text_rows = [i for i, c in enumerate(captions) if c and i not in failed_rows]
            tokens = None
            if text_rows:
                tokens = trim_tokens(self.model, self.clip.tokenizer([captions[i] for i in text_rows]))
                tokens = tokens.to(self.device, non_blocking=True)
            if pixels is not None:
                pixels = pixels.to(self.device, self.dtype, non_blocking=True)
            ready = stream.record_event() if stream is not None else None
        keys = batch["key"]
        return PreparedBatch(keys, image_rows, pixels, ok, failed, text_rows, tokens, ready)

    def compute_batch(self, prepared: PreparedBatch) -> Callable[[], BatchResult]:
        """Run the encoders and start copying the features to the host; returns the function that waits for
        them and builds the batch's table, which the worker calls once the next batch's encoders are queued
        (so the GPU does not wait for the host between batches)."""
        import torch

        p = prepared
        if p.ready is not None:  # the side stream's uploads and decoding are done before the encoders read them
            torch.cuda.current_stream().wait_event(p.ready)
            for tensor in (p.pixels, p.tokens):
                if tensor is not None:
                    tensor.record_stream(torch.cuda.current_stream())
        image_feats = text_feats = None
        with torch.inference_mode():
            if p.pixels is not None:
                image_feats = _to_host(torch.nn.functional.normalize(self._image_features(p.pixels).float(), dim=-1))
            if p.tokens is not None:
                text_feats = _to_host(torch.nn.functional.normalize(encode_text(self.model, p.tokens).float(), dim=-1))
        copied = torch.cuda.current_stream().record_event() if self.device == "cuda" else None
        return lambda: self._batch_result(p, image_feats, text_feats, copied)

    def _image_features(self, pixels: Any) -> Any:
        """The image tower's output; a compiled tower gets every batch padded to the batch size (zeros, cut off
        after), so a shard's short last batch or a batch with undecodable images does not compile again."""
        import torch

        rows, full = pixels.shape[0], self.batch_rows()
        if self.config.compile is None or rows >= full:
            return self._encode_image(pixels)
        padding = pixels.new_zeros((full - rows, *pixels.shape[1:]))
        return self._encode_image(torch.cat([pixels, padding]))[:rows]

    def _batch_result(self, p: PreparedBatch, image_feats: Any, text_feats: Any, copied: Any) -> BatchResult:
        """The batch's table (float16 vectors, nulls where a record has no image or caption) and its rejects."""
        if copied is not None:
            copied.synchronize()
        n, dim = len(p.keys), self.clip.embed_dim
        keys = p.keys.to_pylist()
        image_vectors = np.zeros((n, dim), np.float32)
        text_vectors = np.zeros((n, dim), np.float32)
        has_image = np.zeros(n, bool)
        has_text = np.zeros(n, bool)
        rejected = np.zeros(n, bool)
        rejects: list[Reject] = []
        for j, error in p.failed:
            row = p.image_rows[j]
            rejects.append(Reject(keys[row], "undecodable image", error))
            rejected[row] = True
        if image_feats is not None:
            rows = [p.image_rows[j] for j in p.ok]
            image_vectors[rows] = image_feats.numpy()
            has_image[rows] = True
        if text_feats is not None:
            text_vectors[p.text_rows] = text_feats.numpy()
            has_text[p.text_rows] = True

        keep = ~rejected
        table = pa.table(
            {
                "key": p.keys.filter(pa.array(keep)),
                "image_embedding": to_fixed_list(image_vectors[keep], has_image[keep]),
                "text_embedding": to_fixed_list(text_vectors[keep], has_text[keep]),
            }
        )
        return BatchResult(table, rejects)


def _to_host(features: Any) -> Any:
    """Features on the host: from CUDA an asynchronous copy into pinned memory (wait on an event before
    reading it), on the CPU the tensor itself."""
    return features.to("cpu", non_blocking=True) if features.is_cuda else features


@dataclass
class PreparedBatch:
    """A batch decoded and tokenised, on the worker's device, waiting for the encoders."""

    keys: pa.ChunkedArray | pa.Array
    image_rows: list[int]  # batch rows that have image bytes
    pixels: Any  # (len(ok), 3, S, S) on the device, or None
    ok: list[int]  # positions in image_rows that decoded
    failed: list[tuple[int, str]]  # (position in image_rows, error)
    text_rows: list[int]  # batch rows with a caption and no undecodable image
    tokens: Any  # (len(text_rows), width) on the device, or None
    ready: Any = None  # CUDA event recorded after the side stream's work
