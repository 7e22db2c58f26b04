"""What the trainer updates: LoRA adapters on both towers (the paper's setting) or the full weights.

LoRA comes from peft. It wraps open_clip's towers cleanly: peft's ``MultiheadAttention`` layer adapts the fused
q/k/v and output projections of ``nn.MultiheadAttention`` (open_clip calls ``F.multi_head_attention_forward``
with the module's raw weights, so adapting ``out_proj`` as a plain Linear would silently do nothing), Linear
layers take the MLPs and projections, Conv2d layers the convolutional image towers of the toy models. A test
checks that every adapter parameter receives a gradient and that merging reproduces the adapted outputs.

Checkpoints hold only what trains (the adapters, or every weight for a full fine-tune) plus the base model's
identity, so a ViT-L/14 LoRA checkpoint is megabytes, and loading one into a different base model is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

TOWERS = ("image", "text")


@dataclass(frozen=True)
class AdapterSettings:
    """``finetune``: 'lora' or 'full'; ``towers``: which towers train (the other stays as pretrained)."""

    finetune: str = "lora"
    towers: tuple[str, ...] = TOWERS
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0


def tower_of(name: str) -> str:
    """open_clip keeps the image tower under ``visual.``; everything else with weights is the text side."""
    return "image" if name == "visual" or name.startswith("visual.") else "text"


def lora_targets(model: torch.nn.Module, towers: Iterable[str]) -> list[str]:
    """Full names of the modules LoRA adapts: attention blocks, Linear and Conv2d layers of the chosen towers.

    Layers inside an attention block are left to the block's own adapter (see the module docstring).
    """
    towers = set(towers)
    attention = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    targets = []
    for name, module in model.named_modules():
        if not name or tower_of(name) not in towers:
            continue
        if any(name.startswith(a + ".") for a in attention):
            continue
        if isinstance(module, (torch.nn.MultiheadAttention, torch.nn.Linear, torch.nn.Conv2d)):
            targets.append(name)
    return targets


def attach(model: torch.nn.Module, settings: AdapterSettings) -> torch.nn.Module:
    """Make ``model`` trainable as ``settings`` say, in place; returns the module whose state is checkpointed
    (the peft wrapper for LoRA, the model itself for a full fine-tune). Call it after the frozen reference copy
    was taken."""
    unknown = set(settings.towers) - set(TOWERS)
    if unknown or not settings.towers:
        raise ValueError(f"towers: {sorted(unknown) or 'none given'}; choose from {', '.join(TOWERS)}")
    if settings.finetune == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(tower_of(name) in settings.towers)
        return model
    if settings.finetune != "lora":
        raise ValueError(f"finetune: '{settings.finetune}' is not lora or full")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_targets(model, settings.towers),
    )
    return get_peft_model(model, config)


def untraceable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA attention layers in ``model``: they fold their adapters into the wrapped attention's weights
    around every call (re-registering parameters), which torch.compile cannot trace ("set_ on a graph input")."""
    from peft.tuners.lora.layer import MultiheadAttention

    return [m for m in model.modules() if isinstance(m, MultiheadAttention)]


def trainable_state(wrapper: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what a checkpoint needs beyond the base model)."""
    return {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}


def load_trainable(wrapper: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved trainable parameters back; every one must exist and nothing trainable may be left out."""
    params = dict(wrapper.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint does not fit this model/adapter (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merged(wrapper: torch.nn.Module) -> torch.nn.Module:
    """A plain open_clip model with the adapters folded into its weights (for evaluation and export)."""
    if hasattr(wrapper, "merge_and_unload"):
        return wrapper.merge_and_unload()
    return wrapper
