"""The toy safety world: generated safe/unsafe image-caption quadruplets with ground truth."""

from saferclip_data.toyworld.export import TOY_COLUMNS, world_fingerprint, write_world
from saferclip_data.toyworld.world import (
    CATEGORIES,
    HELD_OUT_PLACES,
    TRAIN_PLACES,
    WorldConfig,
    sample_scene,
    world_records,
)

__all__ = [
    "CATEGORIES",
    "HELD_OUT_PLACES",
    "TOY_COLUMNS",
    "TRAIN_PLACES",
    "WorldConfig",
    "sample_scene",
    "world_fingerprint",
    "world_records",
    "write_world",
]
