"""open_clip model loading, shared by the embed stage and the trainer.

One function, :func:`load_clip`, takes every weight source users have: an open_clip pretrained tag
(``openai``, ``laion2b_s34b_b79k``), a local checkpoint file, an ``hf-hub:org/repo`` id, a ``local-dir:``
folder, or none (random init, seeded). The toy configs shipped in ``model_configs/`` are registered with
open_clip first, so toy models load through the very same path as real ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.registry import Registry


class _QuietRandomInit(logging.Filter):
    """open_clip warns that no weights were loaded; with ``pretrained: null`` that is what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


#: weights a higher layer makes (``pretrained: toy-world``: the tiny CLIP pretrained on the toy world), by tag: an
#: object with ``check(arch) -> problem | None``, ``pending_steps(arch, seed)`` (0 when ready) and
#: ``resolve(arch, seed, on_step) -> checkpoint path`` (making it if needed)
WEIGHTS: Registry = Registry("weights", "saferclip_data.weights")
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_toy_configs() -> None:
    """Make the project's small architectures (``toy-*``) known to open_clip; idempotent."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def _config_files() -> dict[str, Path] | None:
    """Architecture name -> its open_clip config file (open_clip's own and the toy ones), or None where
    open_clip's layout is not the one this reader knows. Read from disk: importing open_clip takes seconds
    (torch, timm, transformers), and a recipe check should not wait for that."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    if not any(folder.is_dir() for folder in folders):
        return None
    found = {}
    for path in [p for folder in [*folders, MODEL_CONFIG_DIR] for p in folder.glob("*.json")]:
        config = json.loads(path.read_text())
        if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):  # open_clip's own test
            found[path.stem] = path
    return found


def known_architectures() -> list[str]:
    """open_clip's architectures and the toy ones."""
    files = _config_files()
    if files is None:
        import open_clip

        register_toy_configs()
        return open_clip.list_models()
    return sorted(files)


def model_config(arch: str) -> dict[str, Any]:
    """The open_clip config of ``arch`` (empty when unknown)."""
    import json

    files = _config_files()
    if files is None:
        import open_clip

        register_toy_configs()
        return open_clip.get_model_config(arch) or {}
    return json.loads(files[arch].read_text()) if arch in files else {}


def pretrained_tags(arch: str) -> list[str]:
    """open_clip's pretrained tags of ``arch``. Read from its ``pretrained`` module alone where open_clip is not
    imported yet (that module needs only the standard library; the package's ``__init__`` pulls in torch)."""
    import sys

    if "open_clip" not in sys.modules:
        try:
            return list(_standalone_pretrained().list_pretrained_tags_by_model(arch))
        except Exception:  # an open_clip layout this reader does not know: import it as usual
            pass
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(arch))


def _standalone_pretrained() -> Any:
    """``open_clip.pretrained`` loaded under a bare package stub, which is removed again afterwards so that a
    later ``import open_clip`` runs the real package."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("open_clip")
    stub = types.ModuleType("open_clip")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = stub
    try:
        return importlib.import_module("open_clip.pretrained")
    finally:
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]


def weight_source_kind(arch: str, pretrained: str | None) -> str:
    """Classify a weight source: 'random', 'hub', 'local-dir', 'file' or 'tag'."""
    if arch.startswith("hf-hub:"):
        return "hub"
    if arch.startswith("local-dir:"):
        return "local-dir"
    if not pretrained:
        return "random"
    if pretrained.startswith("hf-hub:"):
        return "hub"
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return "file"
    return "tag"


def state_dict_digest(model: Any) -> str:
    """sha256 over the weights (names, shapes, dtypes, bytes): the model's identity whatever file it came from."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class LoadedClip:
    model: Any
    preprocess: Any
    tokenizer: Any
    arch: str
    identity: str
    image_size: int
    embed_dim: int


def load_clip(
    arch: str,
    pretrained: str | None = None,
    *,
    init_seed: int = 0,
    cache_dir: str | None = None,
) -> LoadedClip:
    """Create an open_clip model on the CPU in fp32 and compute its identity.

    ``arch`` may be an architecture name (``ViT-B-32``, ``toy-vit-tiny``), ``hf-hub:org/repo`` or
    ``local-dir:/path``; ``pretrained`` a tag or a checkpoint path, or None for a seeded random init.
    Moving to a device and casting is the caller's business (it is decided on the worker).
    """
    import open_clip
    import torch

    from saferclip_data.models.tokens import fast_tokenizer

    register_toy_configs()
    if WEIGHTS.find(pretrained) is not None:  # made by a higher layer: load_recipe_clip resolves it
        raise ValueError(f"'{pretrained}' weights: load them with load_recipe_clip")
    kind = weight_source_kind(arch, pretrained)
    if kind == "file" and not Path(pretrained).is_file():
        raise FileNotFoundError(f"checkpoint not found: {pretrained}")
    if pretrained and pretrained.startswith("hf-hub:"):
        arch, pretrained = pretrained, None
    torch.manual_seed(init_seed)
    quiet = _QuietRandomInit() if kind == "random" else None
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, cache_dir=cache_dir
        )
        tokenizer = fast_tokenizer(open_clip.get_tokenizer(arch))
    except Exception as exc:  # downloads, bad checkpoints: all end as one clear line for the user
        if kind == "random":
            raise
        source = arch if pretrained is None else f"{arch} with weights {pretrained}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"model: cannot load {source} ({kind}): {type(exc).__name__}: {first[:300]}") from exc
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    model.eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["x"])).shape[-1])
    identity = f"{arch}@sha256:{state_dict_digest(model)[:24]}"
    return LoadedClip(model, preprocess, tokenizer, arch, identity, image_size, embed_dim)


@dataclass(frozen=True)
class TextTrim:
    """Drops the padding columns after a batch's last pooled (end-of-text) position.

    Captions are padded to the full context (77 tokens for the OpenAI models) while a typical one uses a
    dozen. Under the causal mask the pooled position never sees the padding after it, so :func:`encode_text`
    on trimmed tokens gives the same features for a fraction of the work (at full width the text tower costs
    about as much as a ViT-B/32 image). Small and picklable, so DataLoader workers can trim while collating;
    it reads the tokens, so call it where they are made (on the CPU), never inside a GPU step.
    """

    pool_type: str
    eos_id: int | None = None

    def width(self, *token_batches: Any) -> int:
        """Columns the batches need: one past the furthest pooled position of any row."""
        widths = [int(self._pooled(t).max()) + 1 for t in token_batches if t.shape[0]]
        return max(widths, default=1)

    def __call__(self, *token_batches: Any) -> Any:
        """The batches cut to one common width (a tuple when given several)."""
        width = self.width(*token_batches)
        cut = tuple(t[:, :width] for t in token_batches)
        return cut if len(cut) != 1 else cut[0]

    def _pooled(self, tokens: Any) -> Any:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)


def text_trim(model: Any) -> TextTrim | None:
    """The model's :class:`TextTrim`, or None where trimming could change the result: no causal mask, 'first'
    or 'last' pooling, a text tower other than open_clip ``CLIP``'s own."""
    import open_clip

    if type(model).encode_text is not open_clip.CLIP.encode_text or getattr(model, "attn_mask", None) is None:
        return None
    if model.text_pool_type == "argmax":
        return TextTrim("argmax")
    if model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        return TextTrim("eos", int(model.text_eos_id))
    return None


def trim_tokens(model: Any, tokens: Any) -> Any:
    """``tokens`` cut by the model's :class:`TextTrim`, or unchanged where it has none."""
    trim = text_trim(model)
    return trim(tokens) if trim is not None else tokens


def encode_text(model: Any, tokens: Any) -> Any:
    """``model.encode_text`` that also takes tokens trimmed by :class:`TextTrim` (narrower than the context):
    the steps of open_clip's ``CLIP.encode_text`` with the positional embedding and the causal mask cut to the
    width. No host synchronisation: the width is the tensor's."""
    import torch
    from open_clip.transformer import text_global_pool

    width = tokens.shape[1]
    if width >= getattr(model, "context_length", width):
        return model.encode_text(tokens)
    if text_trim(model) is None:
        raise ValueError(f"tokens of width {width} for a model whose text tower needs its full context")
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:width].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:width, :width])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection
    return x


#: torch.compile modes the embed stage, the trainer and the benchmarks accept
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]


def load_recipe_clip(arch: str, pretrained: str | None = None, *, init_seed: int = 0,
                     cache_dir: str | None = None) -> LoadedClip:  # fmt: skip
    """:func:`load_clip` for every weight source a recipe may name: a tag of :data:`WEIGHTS` becomes the checkpoint
    its provider makes (once, then cached)."""
    provider = WEIGHTS.find(pretrained)
    if provider is not None:
        pretrained = provider.resolve(arch, init_seed)
    return load_clip(arch, pretrained, init_seed=init_seed, cache_dir=cache_dir)
