"""The embed stage: open_clip image and text embeddings, L2-normalised, stored as float16.

The model is loaded once per worker (``setup``), on the worker's own device: CUDA with bf16 where the worker
has a GPU, the CPU in fp32 otherwise. Images travel as encoded bytes and are decoded here: on the GPU with
nvJPEG (torchvision ``decode_jpeg(device='cuda')``) when CUDA is present, with PIL otherwise. The model
identity (architecture + weights hash) goes into every output file and the stage manifest.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from saferclip_data.pipeline.stage import BatchResult, Reject, Stage, StageConfig
from saferclip_data.training.models import encode_text, trim_tokens

log = logging.getLogger(__name__)


class ModelConfig(BaseModel):
    """The recipe's top-level ``model:`` section: the one embedding model of the recipe."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    arch: str = Field(
        description="open_clip architecture (ViT-B-32, ViT-L-14, toy-vit-tiny), hf-hub:org/repo or local-dir:/path"
    )
    pretrained: str | None = Field(
        default=None, description="pretrained tag (openai), checkpoint path, or null for random init"
    )
    init_seed: int = Field(default=0, description="seed of the random init when pretrained is null")
    cache_dir: str | None = Field(default=None, description="where open_clip keeps downloaded weights")

    @field_validator("pretrained")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        from saferclip_data.training.models import weight_source_kind

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
        from saferclip_data.training.models import TOY_TAG, known_architectures, pretrained_tags, weight_source_kind

        kind = weight_source_kind(self.arch, self.pretrained)
        if kind in ("hub", "local-dir"):
            return self
        if self.pretrained == TOY_TAG:
            if not self.arch.startswith("toy-"):
                raise ValueError(f"model.pretrained: '{TOY_TAG}' is only for the toy architectures, not {self.arch}")
            return self
        if self.arch not in known_architectures():
            raise ValueError(f"model.arch: unknown open_clip architecture '{self.arch}'")
        if kind == "tag" and self.pretrained not in pretrained_tags(self.arch):
            tags = ", ".join(pretrained_tags(self.arch)) or "none"
            raise ValueError(f"model.pretrained: unknown tag '{self.pretrained}' for {self.arch} (known: {tags})")
        return self


class EmbedConfig(StageConfig):
    batch_size: int = Field(default=64, gt=0)
    gpus: float | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = CUDA where the worker has it")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto = bf16 on CUDA, fp32 on CPU"
    )


def load_worker_model(model_cfg: ModelConfig, device: str, precision: str, stage: str):
    """The recipe's model on this worker's own device: CUDA (bf16) where the worker has it, else CPU (fp32).

    Returns (LoadedClip, model in eval mode on the device, device name, torch dtype)."""
    import torch

    from saferclip_data.training.models import load_clip

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise RuntimeError(f"stages.{stage}.device is 'cuda' but this worker has no CUDA device")
    device = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loaded = load_clip(
        model_cfg.arch, model_cfg.pretrained, init_seed=model_cfg.init_seed, cache_dir=model_cfg.cache_dir
    )
    model = loaded.model.to(device, dtype=dtype).eval()
    log.info("%s worker: %s on %s (%s)", stage, loaded.identity, device, precision)
    return loaded, model, device, dtype


def to_fixed_list(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """float16 rows as an Arrow fixed-size list; rows with ``valid`` False become nulls."""
    dim = vectors.shape[1]
    values = pa.array(vectors.astype(np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


class EmbedStage(Stage):
    name = "embed"
    Config = EmbedConfig
    inputs = {"source": ("key", "caption", "image")}
    output_columns = ("key", "image_embedding", "text_embedding")
    recipe_sections = ("model",)
    version = "1"

    config: EmbedConfig

    def prepare(self, progress, workdir) -> None:
        """On the driver, before any worker starts: pretrain the toy CLIP once if the recipe asks for it, so
        that workers only load a cached checkpoint (and the user sees the training progress)."""
        from saferclip_data.training.models import TOY_TAG
        from saferclip_data.training.toy_pretrain import PretrainConfig, checkpoint_path, ensure_pretrained

        model_cfg: ModelConfig = self.sections["model"]
        if model_cfg.pretrained != TOY_TAG:
            return
        config = PretrainConfig(arch=model_cfg.arch, seed=model_cfg.init_seed)
        if checkpoint_path(config).is_file():
            return
        advance = progress.subtask("pretrain toy CLIP", config.steps)
        ensure_pretrained(config, on_step=lambda step, loss: advance(1))

    def setup(self) -> None:
        import torch

        self.clip, self.model, self.device, self.dtype = load_worker_model(
            self.sections["model"], self.config.device, self.config.precision, "embed"
        )
        normalize = next(t for t in self.clip.preprocess.transforms if type(t).__name__ == "Normalize")
        self.mean = torch.tensor(normalize.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalize.std, device=self.device).view(1, 3, 1, 1)

    def output_metadata(self) -> dict[str, str]:
        return {"model_identity": self.clip.identity, "embed_dim": str(self.clip.embed_dim)}

    # ---- decoding ----------------------------------------------------------------------------------------
    def _pixels_cpu(self, blobs: list[bytes]) -> tuple[Any, list[int], list[tuple[int, str]]]:
        import torch
        from PIL import Image

        tensors, ok, failed = [], [], []
        for i, blob in enumerate(blobs):
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    tensors.append(self.clip.preprocess(img.convert("RGB")))
                ok.append(i)
            except Exception as exc:  # PIL raises many types for bad data; each becomes a reject
                failed.append((i, f"{type(exc).__name__}: {exc}"))
        batch = torch.stack(tensors) if tensors else None
        return batch, ok, failed

    def _pixels_cuda(self, blobs: list[bytes]) -> tuple[Any, list[int], list[tuple[int, str]]]:
        """Batched nvJPEG decode, then resize (shortest side), centre crop and normalise on the GPU."""
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        size = self.clip.image_size
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decoded: dict[int, Any] = {}
        failed: list[tuple[int, str]] = []
        jpegs = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]
        try:
            for i, img in zip(jpegs, decode_jpeg([raw[i] for i in jpegs], device="cuda", mode=ImageReadMode.RGB)):
                decoded[i] = img
        except RuntimeError:
            for i in jpegs:  # one bad JPEG fails the batch call: decode one by one to find it
                try:
                    decoded[i] = decode_jpeg(raw[i], device="cuda", mode=ImageReadMode.RGB)
                except RuntimeError as exc:
                    failed.append((i, f"RuntimeError: {exc}"))
        for i in (i for i in range(len(blobs)) if i not in jpegs):
            try:
                decoded[i] = decode_image(raw[i], mode=ImageReadMode.RGB).to("cuda", non_blocking=True)
            except RuntimeError as exc:
                failed.append((i, f"RuntimeError: {exc}"))
        ok = sorted(decoded)
        out = []
        for i in ok:
            img = decoded[i].unsqueeze(0).float()
            h, w = img.shape[-2:]
            scale = size / min(h, w)
            img = F.interpolate(
                img,
                size=(max(size, round(h * scale)), max(size, round(w * scale))),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
            out.append(img[..., top : top + size, left : left + size])
        batch = ((torch.cat(out).clamp_(0, 255) / 255.0 - self.mean) / self.std) if out else None
        return batch, ok, failed

    # ---- the batch function ------------------------------------------------------------------------------
    def process_batch(self, batch: pa.Table) -> BatchResult:
        import torch

        n = batch.num_rows
        dim = self.clip.embed_dim
        keys = batch["key"].to_pylist()
        blobs = batch["image"].to_pylist()
        captions = batch["caption"].to_pylist()
        image_vectors = np.zeros((n, dim), np.float32)
        text_vectors = np.zeros((n, dim), np.float32)
        has_image = np.zeros(n, bool)
        has_text = np.array([bool(c) for c in captions])
        rejects: list[Reject] = []
        rejected = np.zeros(n, bool)

        with torch.inference_mode():
            image_rows = [i for i, b in enumerate(blobs) if b]
            if image_rows:
                decode = self._pixels_cuda if self.device == "cuda" else self._pixels_cpu
                pixels, ok, failed = decode([blobs[i] for i in image_rows])
                for j, error in failed:
                    row = image_rows[j]
                    rejects.append(Reject(keys[row], "undecodable image", error))
                    rejected[row] = True
                if pixels is not None:
                    feats = self.model.encode_image(pixels.to(self.device, self.dtype))
                    feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
                    rows = [image_rows[j] for j in ok]
                    image_vectors[rows] = feats
                    has_image[rows] = True
            text_rows = [i for i in range(n) if has_text[i] and not rejected[i]]
            if text_rows:
                tokens = self.clip.tokenizer([captions[i] for i in text_rows])
                feats = encode_text(self.model, trim_tokens(self.model, tokens).to(self.device))
                text_vectors[text_rows] = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

        keep = ~rejected
        table = pa.table(
            {
                "key": batch["key"].filter(pa.array(keep)),
                "image_embedding": to_fixed_list(image_vectors[keep], has_image[keep]),
                "text_embedding": to_fixed_list(text_vectors[keep], (has_text & keep)[keep]),
            }
        )
        return BatchResult(table, rejects)
