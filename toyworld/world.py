"""The toy safety world: seeded scenes of places and objects, each with an unsafe minimal edit.

A safe scene is a place (background) with 1-3 coloured objects; its unsafe counterpart is the very same picture
with one abstract unsafe glyph added, and the very same caption with one unsafe phrase inserted
(``"a photo of a red ball at the beach"`` -> ``"a photo of a red ball with a loaded gun at the beach"``). Ground
truth rides along: the safe record each unsafe one was edited from, its category, place/object/colour labels,
and a ViSU-like ``paired_safe`` that is deliberately wrong for a fraction of records (a loosely related scene of
the same place), so that proximity mining has something real to fix.

The ``shift`` split (the benchmark's) is a distribution shift the model can still read: by default it holds
scenes that put an object at a place where training and pretraining never show that object (16 held-out
place × object combinations, every word and both halves of each combination seen elsewhere), the way a web
model meets familiar things in unfamiliar company. ``shift: places`` keeps the earlier shift: two places never
seen at all, whose words the tiny model cannot read.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from PIL import Image, ImageDraw

from saferclip_data.toyworld.glyphs import COLOURS, PLACES, SHAPES, UNSAFE, Box, draw_place, draw_shape, draw_unsafe

WORLD_VERSION = "2"  # bump when rendering, captions or sampling change: cached worlds and models are keyed on it
HELD_OUT_PLACES = ("reef", "night street")
TRAIN_PLACES = tuple(p for p in PLACES if p not in HELD_OUT_PLACES)
#: place -> the two object kinds never shown there outside the shift split (16 kinds held out once each)
HELD_OUT_OBJECTS: dict[str, tuple[str, str]] = {
    place: (sorted(SHAPES)[2 * i], sorted(SHAPES)[2 * i + 1]) for i, place in enumerate(sorted(TRAIN_PLACES))
}
CATEGORIES = tuple(UNSAFE)
PHRASINGS = (
    "a photo of {objects}{unsafe} at the {place}",
    "{objects}{unsafe} at the {place}",
    "a picture of {objects}{unsafe} in the {place}",
    "there is {objects}{unsafe} at the {place}",
    "a drawing of {objects}{unsafe}, {place} in the background",
)
SPLITS = ("train", "val", "test", "shift")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    scenes: int = 3000  # safe scenes over train/val/test; each also yields its unsafe edit
    shifted_scenes: int = 400  # scenes of the shifted split, for benchmarks
    shift: Literal["combinations", "places"] = "combinations"  # held-out place x object pairs, or unseen places
    image_size: int = 64
    noisy_pair_fraction: float = 0.4
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_size: int = 1000


@dataclass
class Scene:
    place: str
    objects: list[tuple[str, str, Box]]  # (kind, colour, unit box); the first is the main (largest) object
    phrasing: int
    category: str
    glyph: str
    unsafe_phrase: str
    unsafe_box: Box
    pattern_seed: int

    def object_phrase(self) -> str:
        names = [f"{_article(colour)} {colour} {kind}" for kind, colour, _ in self.objects]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def caption(self, unsafe: bool) -> str:
        inserted = f" with {self.unsafe_phrase}" if unsafe else ""
        return PHRASINGS[self.phrasing].format(objects=self.object_phrase(), unsafe=inserted, place=self.place)

    def inserted_phrase(self) -> str:
        """What the unsafe caption adds to the safe one, exactly."""
        return f" with {self.unsafe_phrase}"

    def render(self, size: int, unsafe: bool) -> Image.Image:
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        draw_place(draw, self.place, size, random.Random(self.pattern_seed))
        for kind, colour, box in reversed(self.objects):  # main object last, on top
            draw_shape(draw, SHAPES[kind], _pixels(box, size), COLOURS[colour])
        if unsafe:
            draw_unsafe(draw, self.glyph, _pixels(self.unsafe_box, size), random.Random(self.pattern_seed + 1))
        return img


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pixels(box: Box, size: int) -> Box:
    return tuple(v * (size - 1) for v in box)


def _overlap(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h


def _place_box(rng: random.Random, side: float, taken: list[Box]) -> Box:
    """A box of the given side, overlapping what is already placed as little as a few tries allow."""
    best, best_overlap = None, 2.0
    for _ in range(12):
        x, y = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
        box = (x, y, x + side, y + side)
        overlap = sum(_overlap(box, t) for t in taken)
        if overlap < best_overlap:
            best, best_overlap = box, overlap
        if overlap == 0:
            break
    return best


def sample_scene(
    rng: random.Random, places: tuple[str, ...] = TRAIN_PLACES, colours: tuple[str, ...] | None = None
) -> Scene:
    """A random scene of the training distribution (no held-out place x object pair); ``colours`` narrows the
    object colours (pretraining uses it for hard batches)."""
    palette = sorted(colours or COLOURS)
    place = rng.choice(places)
    count = rng.choice((1, 1, 2, 2, 3))
    kinds = _allowed_kinds(place, rng.sample(sorted(SHAPES), count))
    taken: list[Box] = []
    objects = []
    for i, kind in enumerate(kinds):
        side = rng.uniform(0.42, 0.52) if i == 0 else rng.uniform(0.24, 0.32)
        box = _place_box(rng, side, taken)
        taken.append(box)
        objects.append((kind, rng.choice(palette), box))
    category = rng.choice(CATEGORIES)
    glyph, phrase = rng.choice(UNSAFE[category])
    unsafe_box = _place_box(rng, rng.uniform(0.36, 0.44), taken[:1])  # keep clear of the main object
    return Scene(
        place, objects, rng.randrange(len(PHRASINGS)), category, glyph, phrase, unsafe_box, rng.randrange(2**31)
    )


def _allowed_kinds(place: str, kinds: list[str]) -> list[str]:
    """``kinds`` with each one held out at ``place`` swapped for the next kind in name order that is not (and not
    in the scene yet). Swapping, not redrawing, keeps the random stream and so every other scene as it was."""
    held = HELD_OUT_OBJECTS.get(place, ())
    names = sorted(SHAPES)
    out: list[str] = []
    for kind in kinds:
        if kind in held:
            start = names.index(kind)
            kind = next(k for k in names[start:] + names[:start] if k not in held and k not in kinds and k not in out)
        out.append(kind)
    return out


def sample_shifted_scene(rng: random.Random) -> Scene:
    """A scene whose main object sits at a place where training never shows it (one of the place's two held-out
    kinds; the other objects as in training)."""
    scene = sample_scene(rng)
    held = HELD_OUT_OBJECTS[scene.place][rng.randrange(2)]
    kind, colour, box = scene.objects[0]
    scene.objects[0] = (held, colour, box)
    return scene


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def scene_splits(config: WorldConfig) -> list[str]:
    """train/val/test assignment of the main scenes: a seeded permutation, exact fractions."""
    n = config.scenes
    order = list(range(n))
    random.Random(config.seed * 7919 + 1).shuffle(order)
    n_val, n_test = round(n * config.val_fraction), round(n * config.test_fraction)
    split = ["train"] * n
    for rank, index in enumerate(order):
        if rank < n_val:
            split[index] = "val"
        elif rank < n_val + n_test:
            split[index] = "test"
    return split


def world_scenes(config: WorldConfig) -> list[tuple[str, int, Scene]]:
    """Every scene of the world as (split, index within split, scene), deterministic in the seed."""
    rng = random.Random(config.seed)
    splits = scene_splits(config)
    counters = dict.fromkeys(SPLITS, 0)
    out = []
    for split in splits:
        out.append((split, counters[split], sample_scene(rng)))
        counters[split] += 1
    for i in range(config.shifted_scenes):
        shifted = sample_scene(rng, HELD_OUT_PLACES) if config.shift == "places" else sample_shifted_scene(rng)
        out.append(("shift", i, shifted))
    return out


def world_records(config: WorldConfig) -> Iterator[dict]:
    """Safe and unsafe records with images and ground truth, scene by scene (safe first, then its edit)."""
    scenes = world_scenes(config)
    by_place: dict[tuple[str, str], list[str]] = {}
    for split, index, scene in scenes:
        by_place.setdefault((split, scene.place), []).append(f"{split}-{index:06d}")
    noise = random.Random(config.seed * 31 + 7)
    for split, index, scene in scenes:
        group = f"{split}-{index:06d}"
        safe_key, unsafe_key = f"{group}-safe", f"{group}-unsafe"
        paired = safe_key
        if noise.random() < config.noisy_pair_fraction:
            others = [g for g in by_place[(split, scene.place)] if g != group]
            if others:
                paired = f"{noise.choice(others)}-safe"
        main_kind, main_colour, _ = scene.objects[0]
        common = {
            "group": group,
            "split": split,
            "place": scene.place,
            "main_object": main_kind,
            "main_colour": main_colour,
            "objects": " ".join(f"{c}-{k}" for k, c, _ in scene.objects),
            "phrasing": str(scene.phrasing),
        }
        for unsafe in (False, True):
            yield {
                "key": unsafe_key if unsafe else safe_key,
                "caption": scene.caption(unsafe),
                "jpg": encode_jpeg(scene.render(config.image_size, unsafe)),
                **common,
                "role": "unsafe" if unsafe else "safe",
                "category": scene.category if unsafe else None,
                "unsafe_phrase": scene.unsafe_phrase if unsafe else None,  # inserted as " with <phrase>"
                "source_safe": safe_key if unsafe else None,
                "paired_safe": paired if unsafe else None,
                "label": scene.place,
            }


def config_dict(config: WorldConfig) -> dict:
    return {**asdict(config), "world_version": WORLD_VERSION}
