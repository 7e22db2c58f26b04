"""The trained CLIP and its truly frozen reference copy (T0, V0), and the step that feeds the losses.

Safe-CLIP's released code wraps its "reference" encoders in LoRA in place, so the reference trains along with
the model it is meant to anchor. Here the reference is a separate deep copy taken before any adapter or
optimiser sees the model: its parameters have ``requires_grad = False``, it stays in eval mode, and it is only
ever called under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy

import torch

from .losses import Embeddings, SaferWeights, safeclip_loss, saferclip_loss


class TrainedWithReference:
    """``model`` is trained; ``reference`` is the frozen copy of it as it was when this object was made."""

    def __init__(self, model: torch.nn.Module):
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.model = model.train()
        for module in self.model.modules():
            # batch-norm statistics stay as pretrained: in train mode they would follow each batch, and the
            # preservation terms would measure the mode switch instead of the fine-tuning
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def reference_embeddings(self, images: torch.Tensor | None, texts: torch.Tensor):
        image = self.reference.encode_image(images) if images is not None else None
        return image, self.reference.encode_text(texts)

    def embeddings(self, batch: dict) -> Embeddings:
        """Trained and frozen embeddings of a streamed batch (``training.data.collate``); batches whose unsafe
        records lack images train the text side only."""
        with_images = bool(batch["has_image"].all()) and bool(batch["has_safe_image"].all())
        m = self.model
        unsafe_img = batch["unsafe_image"] if with_images else None
        safe_img = batch["safe_image"] if with_images else None
        ref_unsafe_image, ref_unsafe_text = self.reference_embeddings(unsafe_img, batch["unsafe_text"])
        ref_safe_image, ref_safe_text = self.reference_embeddings(safe_img, batch["safe_text"])
        return Embeddings(
            unsafe_image=m.encode_image(unsafe_img) if with_images else None,
            unsafe_text=m.encode_text(batch["unsafe_text"]),
            safe_image=m.encode_image(safe_img) if with_images else None,
            safe_text=m.encode_text(batch["safe_text"]),
            ref_unsafe_image=ref_unsafe_image,
            ref_unsafe_text=ref_unsafe_text,
            ref_safe_image=ref_safe_image,
            ref_safe_text=ref_safe_text,
            target_image=batch["target_image"] if with_images else None,
            target_text=batch["target_text"],
        )

    def loss(self, batch: dict, method: str = "saferclip", weights: SaferWeights | None = None):
        """(loss, parts) of one batch for ``method`` saferclip or safeclip (the baseline's fixed given pair)."""
        e = self.embeddings(batch)
        if method == "saferclip":
            return saferclip_loss(e, weights or SaferWeights())
        if method == "safeclip":
            return safeclip_loss(e)
        raise ValueError(f"unknown method '{method}' (saferclip, safeclip)")
