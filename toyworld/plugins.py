"""What the toy world provides to the layers below it, found through entry points (see ``pyproject.toml``):
its pretrained tiny CLIP as the ``toy-world`` weights, its generated shards as the ``toy`` source kind and its
categories as the ``toy-world`` taxonomy. Nothing below imports this module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

TAG = "toy-world"


class ToyWeights:
    """``model.pretrained: toy-world``: the tiny CLIP pretrained on the toy world, cached per architecture and
    seed (pretrained on first use)."""

    @staticmethod
    def check(arch: str) -> str | None:
        return None if arch.startswith("toy-") else f"'{TAG}' is only for the toy architectures, not {arch}"

    @staticmethod
    def pending_steps(arch: str, seed: int) -> int:
        from saferclip_data.toyworld.pretrain import PretrainConfig, checkpoint_path

        config = PretrainConfig(arch=arch, seed=seed)
        return 0 if checkpoint_path(config).is_file() else config.steps

    @staticmethod
    def resolve(arch: str, seed: int, on_step: Callable[[int], None] | None = None) -> str:
        from saferclip_data.toyworld.pretrain import PretrainConfig, ensure_pretrained

        step = (lambda n, loss: on_step(1)) if on_step else None
        return str(ensure_pretrained(PretrainConfig(arch=arch, seed=seed), on_step=step)[0])


class ToySource:
    """``source.kind: toy``: the generated safety world written once as WebDataset shards (cached by its settings
    under ``cache``), with its ground-truth columns."""

    @staticmethod
    def columns() -> tuple[str, ...]:
        from saferclip_data.toyworld import TOY_COLUMNS

        return tuple(TOY_COLUMNS)

    @staticmethod
    def fingerprint(options: dict[str, Any]) -> str:
        from saferclip_data.toyworld import WorldConfig, world_fingerprint

        return world_fingerprint(WorldConfig(**options))

    @classmethod
    def shards(cls, options: dict[str, Any], folder: Path | None, cache: Path) -> Path:
        """The folder of the world's tar shards, generated if absent."""
        from saferclip_data.toyworld import WorldConfig, write_world

        folder = folder or cache / TAG / cls.fingerprint(options)
        if not (folder / "world.json").is_file():
            write_world(WorldConfig(**options), folder)
        return folder / "shards"


def toy_taxonomy() -> dict[str, list[str]]:
    """``taxonomy: toy-world``: the toy world's categories with the words its captions use."""
    from saferclip_data.toyworld.glyphs import UNSAFE

    return {category: [f"a photo with {phrase}" for _, phrase in variants] for category, variants in UNSAFE.items()}
