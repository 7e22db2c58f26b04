"""The trained CLIP and its truly frozen reference copy (T0, V0), and the step that feeds the losses.

Safe-CLIP's released code wraps its "reference" encoders in LoRA in place, so the reference trains along with
the model it is meant to anchor. Here the reference is a separate deep copy taken before any adapter or
optimiser sees the model: its parameters have ``requires_grad = False``, it stays in eval mode, and it is only
ever called under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from saferclip_data.models.clip import encode_text
from saferclip_data.training.adapters import AdapterSettings, attach, untraceable_layers
from saferclip_data.training.losses import Embeddings, SaferWeights, safeclip_loss, saferclip_loss


def compile_towers(model: torch.nn.Module, mode: str) -> list[str]:
    """Compile the model's image and text transformers in place with ``nn.Module.compile``, which keeps parameter
    names, so state dicts, adapters and checkpoints stay as they are; returns the towers compiled. A tower with
    LoRA attention layers stays eager (``adapters.untraceable_layers``: with a graph break around each of them,
    compiling hit torch's recompile limit and gained nothing). Shapes may change between calls (the trimmed
    caption width, the rows that have images): torch then compiles once more with those sizes dynamic."""
    compiled = []
    for name in ("visual", "transformer", "text"):
        tower = getattr(model, name, None)
        if isinstance(tower, torch.nn.Module) and not untraceable_layers(tower):
            tower.compile(mode=mode)
            compiled.append(name)
    return compiled


class BatchEncoder(torch.nn.Module):
    """The trained side's embeddings of a batch in one forward call, so that DistributedDataParallel sees (and
    synchronises) every trained weight; unsafe and safe items go through each tower as one batch."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, unsafe_text, safe_text, unsafe_image=None, safe_image=None):
        texts = encode_text(self.model, torch.cat([unsafe_text, safe_text])).chunk(2)
        if unsafe_image is None or len(unsafe_image) == 0:
            return (*texts, None, None)
        images = self.model.encode_image(torch.cat([unsafe_image, safe_image])).chunk(2)
        return (*texts, *images)


class TrainedWithReference:
    """``model`` is trained (as ``adapter`` says); ``reference`` is the frozen copy of it as it was before."""

    def __init__(
        self, model: torch.nn.Module, adapter: AdapterSettings | None = None, reference_dtype: torch.dtype | None = None
    ):
        """``reference_dtype``: the frozen copy's weights (bf16 on a GPU: it is never trained, so it needs no
        fp32 master weights, and bf16 weights run ~1.4x faster than autocast over fp32 ones); None keeps the
        model's."""
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        if reference_dtype is not None:
            self.reference.to(reference_dtype)
        self.reference_dtype = reference_dtype
        self.model = model.train()
        #: what a checkpoint saves (the peft wrapper with LoRA; the model itself for a full fine-tune)
        self.wrapper = attach(self.model, adapter or AdapterSettings(finetune="full"))
        for module in self.model.modules():
            # batch-norm statistics stay as pretrained: in train mode they would follow each batch, and the
            # preservation terms would measure the mode switch instead of the fine-tuning
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        #: the module called for the trained embeddings; the trainer swaps in a DDP wrapper of it
        self.encoder: torch.nn.Module = BatchEncoder(self.model)

    def compile(self, mode: str) -> dict[str, list[str]]:
        """torch.compile the towers of the reference and of the trained model (:func:`compile_towers`; with LoRA
        the trained towers stay eager): fused layer norms, activations and casts around the matmuls. Compiling
        happens on the first steps. Returns which towers were compiled."""
        return {"trained": compile_towers(self.model, mode), "reference": compile_towers(self.reference, mode)}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def reference_embeddings(self, unsafe_image, safe_image, unsafe_text, safe_text):
        """V0(v*), V0(v), T0(t*), T0(t): each tower called once on the unsafe and safe items together (one big
        batch keeps a GPU busier than two); the images are None when the batch has none. A reference in its own
        dtype runs outside autocast (which would run its layer norms in fp32 and cast around them)."""
        plain = self.reference_dtype is not None
        with torch.autocast(unsafe_text.device.type, enabled=False) if plain else contextlib.nullcontext():
            texts = encode_text(self.reference, torch.cat([unsafe_text, safe_text])).chunk(2)
            if unsafe_image is None or len(unsafe_image) == 0:
                return None, None, *texts
            images = torch.cat([unsafe_image, safe_image])
            return (*self.reference.encode_image(images.to(self.reference_dtype) if plain else images).chunk(2), *texts)

    def embeddings(self, batch: dict) -> Embeddings:
        """Trained and frozen embeddings of a streamed batch (``training.data.collate``). Image fields cover
        the rows whose unsafe and safe items both have images (``image_rows``); text fields cover every row."""
        rows = (batch["has_image"] & batch["has_safe_image"]).cpu()  # host-side flags (trainer): no device wait
        all_rows = bool(rows.all())
        index = None if all_rows else torch.nonzero(rows).flatten().to(batch["unsafe_image"].device)

        def image_part(images: torch.Tensor) -> torch.Tensor:
            return images if index is None else images.index_select(0, index)

        unsafe_img, safe_img = image_part(batch["unsafe_image"]), image_part(batch["safe_image"])
        ref_unsafe_image, ref_safe_image, ref_unsafe_text, ref_safe_text = self.reference_embeddings(
            unsafe_img, safe_img, batch["unsafe_text"], batch["safe_text"]
        )
        unsafe_text, safe_text, unsafe_image, safe_image = self.encoder(
            batch["unsafe_text"], batch["safe_text"], unsafe_img, safe_img
        )
        target_image = image_part(batch["target_image"])
        return Embeddings(
            unsafe_image=unsafe_image,
            unsafe_text=unsafe_text,
            safe_image=safe_image,
            safe_text=safe_text,
            ref_unsafe_image=ref_unsafe_image,
            ref_unsafe_text=ref_unsafe_text,
            ref_safe_image=ref_safe_image,
            ref_safe_text=ref_safe_text,
            target_image=target_image if unsafe_image is not None else None,
            target_text=batch["target_text"],
            image_rows=index,
        )

    def loss(self, batch: dict, method: str = "saferclip", weights: SaferWeights | None = None):
        """(loss, parts) of one batch for ``method`` saferclip or safeclip (the baseline's fixed given pair)."""
        e = self.embeddings(batch)
        if method == "saferclip":
            return saferclip_loss(e, weights or SaferWeights())
        if method == "safeclip":
            return safeclip_loss(e)
        raise ValueError(f"unknown method '{method}' (saferclip, safeclip)")
