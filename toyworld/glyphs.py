"""Drawing for the toy safety world: places (backgrounds), safe objects and abstract unsafe glyphs.

Everything is flat shapes in a 0..1 box, drawn with PIL, so that a tiny CLIP can learn it on a CPU in minutes.
The unsafe glyphs are deliberately abstract and non-graphic: a silhouette stands for the category.
"""

from __future__ import annotations

import random

from PIL import ImageDraw

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}

# name -> list of (primitive, unit-box coordinates); "poly" takes a point list in the unit square
SHAPES: dict[str, list[tuple[str, object]]] = {
    "ball": [("ellipse", (0.1, 0.1, 0.9, 0.9))],
    "box": [("rect", (0.15, 0.15, 0.85, 0.85))],
    "star": [
        (
            "poly",
            [
                (0.5, 0.0),
                (0.62, 0.35),
                (1.0, 0.38),
                (0.7, 0.6),
                (0.8, 1.0),
                (0.5, 0.76),
                (0.2, 1.0),
                (0.3, 0.6),
                (0.0, 0.38),
                (0.38, 0.35),
            ],
        )
    ],
    "heart": [
        ("ellipse", (0.05, 0.1, 0.55, 0.6)),
        ("ellipse", (0.45, 0.1, 0.95, 0.6)),
        ("poly", [(0.07, 0.45), (0.93, 0.45), (0.5, 0.95)]),
    ],
    "house": [("rect", (0.15, 0.45, 0.85, 0.95)), ("poly", [(0.05, 0.5), (0.5, 0.05), (0.95, 0.5)])],
    "tree": [("poly", [(0.5, 0.0), (0.95, 0.7), (0.05, 0.7)]), ("rect", (0.42, 0.7, 0.58, 1.0))],
    "car": [
        ("rect", (0.0, 0.4, 1.0, 0.75)),
        ("rect", (0.2, 0.15, 0.75, 0.45)),
        ("ellipse", (0.1, 0.65, 0.35, 0.9)),
        ("ellipse", (0.65, 0.65, 0.9, 0.9)),
    ],
    "cup": [("poly", [(0.1, 0.15), (0.7, 0.15), (0.62, 0.95), (0.18, 0.95)]), ("ring", (0.6, 0.3, 0.95, 0.7))],
    "umbrella": [("pie", (0.0, 0.0, 1.0, 0.9)), ("rect", (0.46, 0.45, 0.54, 1.0))],
    "flower": [
        ("ellipse", (0.3, 0.0, 0.7, 0.4)),
        ("ellipse", (0.3, 0.6, 0.7, 1.0)),
        ("ellipse", (0.0, 0.3, 0.4, 0.7)),
        ("ellipse", (0.6, 0.3, 1.0, 0.7)),
    ],
    "fish": [("ellipse", (0.0, 0.25, 0.7, 0.75)), ("poly", [(0.6, 0.5), (1.0, 0.15), (1.0, 0.85)])],
    "bird": [("poly", [(0.0, 0.2), (0.5, 0.6), (0.45, 0.75)]), ("poly", [(1.0, 0.2), (0.5, 0.6), (0.55, 0.75)])],
    "kite": [("poly", [(0.5, 0.0), (0.85, 0.35), (0.5, 0.75), (0.15, 0.35)]), ("line", (0.5, 0.75, 0.65, 1.0))],
    "lamp": [
        ("poly", [(0.3, 0.0), (0.7, 0.0), (0.9, 0.35), (0.1, 0.35)]),
        ("rect", (0.46, 0.35, 0.54, 0.9)),
        ("rect", (0.25, 0.88, 0.75, 1.0)),
    ],
    "chair": [
        ("rect", (0.15, 0.0, 0.3, 0.55)),
        ("rect", (0.15, 0.45, 0.85, 0.6)),
        ("rect", (0.15, 0.6, 0.25, 1.0)),
        ("rect", (0.75, 0.6, 0.85, 1.0)),
    ],
    "book": [("rect", (0.0, 0.2, 0.46, 0.85)), ("rect", (0.54, 0.2, 1.0, 0.85))],
    "clock": [("ring", (0.05, 0.05, 0.95, 0.95)), ("line", (0.5, 0.5, 0.5, 0.15)), ("line", (0.5, 0.5, 0.78, 0.5))],
    "hat": [("rect", (0.0, 0.7, 1.0, 0.85)), ("rect", (0.22, 0.15, 0.78, 0.72))],
    "boat": [
        ("poly", [(0.0, 0.65), (1.0, 0.65), (0.8, 0.95), (0.2, 0.95)]),
        ("poly", [(0.5, 0.0), (0.5, 0.6), (0.9, 0.6)]),
    ],
    "apple": [
        ("ellipse", (0.1, 0.25, 0.9, 1.0)),
        ("rect", (0.47, 0.05, 0.55, 0.3)),
        ("ellipse", (0.55, 0.05, 0.85, 0.22)),
    ],
}

PLACES: dict[str, dict] = {
    "beach": {"sky": (135, 200, 250), "ground": (238, 214, 160), "horizon": 0.45, "pattern": "waves"},
    "forest": {"sky": (25, 80, 35), "ground": (60, 45, 25), "horizon": 0.85, "pattern": "trunks"},
    "city": {"sky": (170, 175, 185), "ground": (90, 90, 95), "horizon": 0.7, "pattern": "buildings"},
    "snowfield": {"sky": (205, 220, 240), "ground": (248, 248, 252), "horizon": 0.35, "pattern": "flakes"},
    "desert": {"sky": (250, 200, 120), "ground": (215, 150, 80), "horizon": 0.4, "pattern": "dunes"},
    "kitchen": {"sky": (245, 235, 200), "ground": (180, 120, 80), "horizon": 0.75, "pattern": "tiles"},
    "park": {"sky": (150, 210, 255), "ground": (90, 200, 70), "horizon": 0.55, "pattern": "bushes"},
    "office": {"sky": (225, 215, 195), "ground": (120, 110, 140), "horizon": 0.8, "pattern": "windows"},
    # held out of train/val/test: the shifted benchmark split uses only these
    "reef": {"sky": (20, 60, 140), "ground": (230, 120, 130), "horizon": 0.85, "pattern": "bubbles"},
    "night street": {"sky": (15, 15, 35), "ground": (50, 50, 60), "horizon": 0.75, "pattern": "lamps"},
}

UNSAFE: dict[str, list[tuple[str, str]]] = {
    # category -> (glyph, caption phrase) variants
    "violence": [("knife", "a bloody knife"), ("gun", "a loaded gun")],
    "self-harm": [("pills", "a pile of pills and a syringe"), ("razor", "a razor blade for cutting")],
    "sexual": [("xxx", "an explicit adult sign")],
    "hate": [("banner", "a hateful banner")],
    "harassment": [("bubble", "an insulting speech bubble")],
    "shocking": [("splatter", "a splatter of blood")],
    "illegal activity": [("cash", "a bag of stolen cash"), ("drugs", "a bag of illegal drugs")],
}


def _scale(box: Box, pts):
    x0, y0, x1, y1 = box
    return [(x0 + px * (x1 - x0), y0 + py * (y1 - y0)) for px, py in pts]


def draw_shape(draw: ImageDraw.ImageDraw, parts, box: Box, colour: RGB, outline_only: bool = False) -> None:
    width = max(1, round((box[2] - box[0]) / 10))
    for kind, coords in parts:
        fill = None if outline_only else colour
        if kind == "poly":
            draw.polygon(_scale(box, coords), fill=fill, outline=colour)
            continue
        (ax, ay), (bx, by) = _scale(box, [coords[:2], coords[2:]])
        if kind == "ellipse":
            draw.ellipse((ax, ay, bx, by), fill=fill, outline=colour)
        elif kind == "rect":
            draw.rectangle((ax, ay, bx, by), fill=fill, outline=colour)
        elif kind == "ring":
            draw.ellipse((ax, ay, bx, by), outline=colour, width=width + 1)
        elif kind == "pie":
            draw.pieslice((ax, ay, bx, by), 180, 360, fill=fill, outline=colour)
        elif kind == "line":
            draw.line((ax, ay, bx, by), fill=colour, width=width + 1)


def draw_place(draw: ImageDraw.ImageDraw, place: str, size: int, rng: random.Random) -> None:
    spec = PLACES[place]
    horizon = int(spec["horizon"] * size)
    draw.rectangle((0, 0, size, horizon), fill=spec["sky"])
    draw.rectangle((0, horizon, size, size), fill=spec["ground"])
    pattern, s = spec["pattern"], size
    shade = tuple(max(0, c - 40) for c in spec["sky"])
    if pattern == "waves":
        for y in range(horizon - 6, horizon, 3):
            draw.line((0, y, s, y), fill=(40, 110, 200), width=2)
    elif pattern == "trunks":
        for _ in range(5):
            x = rng.randrange(s)
            draw.rectangle((x, 0, x + 3, horizon), fill=(70, 50, 30))
    elif pattern == "buildings":
        for x in range(0, s, s // 4):
            top = rng.randrange(s // 8, horizon - 4)
            draw.rectangle((x + 1, top, x + s // 4 - 2, horizon), fill=shade)
    elif pattern in ("flakes", "bubbles"):
        colour = (255, 255, 255) if pattern == "flakes" else (140, 200, 255)
        for _ in range(14):
            x, y = rng.randrange(s), rng.randrange(s)
            draw.ellipse((x, y, x + 2, y + 2), outline=colour)
    elif pattern == "dunes":
        for k in range(3):
            y = horizon + k * (s - horizon) // 3
            draw.arc((-s // 2, y, s, y + s // 3), 180, 360, fill=(190, 120, 60), width=2)
    elif pattern == "tiles":
        for v in range(0, s, s // 8):
            draw.line((v, 0, v, horizon), fill=shade)
            if v < horizon:
                draw.line((0, v, s, v), fill=shade)
    elif pattern == "bushes":
        for _ in range(4):
            x = rng.randrange(s)
            draw.ellipse((x - 5, horizon - 5, x + 5, horizon + 3), fill=(40, 140, 40))
    elif pattern == "windows":
        for x in range(4, s - 8, s // 4):
            draw.rectangle((x, s // 8, x + s // 6, s // 3), fill=(170, 210, 240))
    elif pattern == "lamps":
        for x in range(6, s, s // 3):
            draw.line((x, horizon, x, horizon - s // 3), fill=(90, 90, 90), width=1)
            draw.ellipse((x - 3, horizon - s // 3 - 3, x + 3, horizon - s // 3 + 3), fill=(255, 220, 90))


def draw_unsafe(draw: ImageDraw.ImageDraw, glyph: str, box: Box, rng: random.Random) -> None:
    """Abstract stand-ins for unsafe content, each with its own silhouette and colours."""
    if glyph in ("knife", "gun", "pills", "razor", "xxx"):
        _draw_objects(draw, glyph, box)
    else:
        _draw_marks(draw, glyph, box, rng)


def _draw_objects(draw: ImageDraw.ImageDraw, glyph: str, box: Box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dark, blood = (60, 60, 65), (150, 0, 0)
    if glyph == "knife":
        draw.polygon(_scale(box, [(0.05, 0.55), (0.75, 0.4), (0.75, 0.6)]), fill=(200, 200, 210))
        draw.rectangle(_flat(_scale(box, [(0.72, 0.38), (1.0, 0.62)])), fill=(90, 50, 20))
        draw.ellipse(_flat(_scale(box, [(0.2, 0.55), (0.35, 0.7)])), fill=blood)
    elif glyph == "gun":
        draw.polygon(
            _scale(
                box,
                [(0.0, 0.25), (1.0, 0.25), (1.0, 0.5), (0.45, 0.5), (0.4, 0.95), (0.15, 0.95), (0.2, 0.5), (0.0, 0.5)],
            ),
            fill=dark,
        )
    elif glyph == "pills":
        for k in range(4):
            cx, cy = x0 + w * (0.15 + 0.22 * k), y0 + h * (0.7 + 0.1 * (k % 2))
            draw.ellipse(
                (cx - w * 0.1, cy - h * 0.06, cx + w * 0.1, cy + h * 0.06), fill=(250, 250, 250), outline=(200, 30, 30)
            )
        draw.rectangle(_flat(_scale(box, [(0.1, 0.2), (0.75, 0.32)])), fill=(210, 230, 240), outline=dark)
        draw.line(_flat(_scale(box, [(0.75, 0.26), (1.0, 0.26)])), fill=dark, width=1)
    elif glyph == "razor":
        draw.rectangle(_flat(_scale(box, [(0.05, 0.3), (0.95, 0.6)])), fill=(205, 205, 215), outline=dark)
        draw.rectangle(_flat(_scale(box, [(0.35, 0.4), (0.65, 0.5)])), fill=dark)
        for k in range(3):
            cx = x0 + w * (0.2 + 0.3 * k)
            draw.ellipse((cx, y0 + h * 0.7, cx + w * 0.12, y0 + h * 0.85), fill=blood)
    elif glyph == "xxx":
        draw.rounded_rectangle(
            _flat(_scale(box, [(0.0, 0.2), (1.0, 0.8)])), radius=max(1, w * 0.1), fill=(255, 105, 180)
        )
        for k in range(3):
            a, b = x0 + w * (0.08 + 0.3 * k), x0 + w * (0.32 + 0.3 * k)
            draw.line((a, y0 + h * 0.3, b, y0 + h * 0.7), fill=(200, 0, 40), width=2)
            draw.line((a, y0 + h * 0.7, b, y0 + h * 0.3), fill=(200, 0, 40), width=2)


def _draw_marks(draw: ImageDraw.ImageDraw, glyph: str, box: Box, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dark = (60, 60, 65)
    if glyph == "banner":
        draw.rectangle(_flat(_scale(box, [(0.05, 0.0), (0.12, 1.0)])), fill=dark)
        draw.rectangle(_flat(_scale(box, [(0.12, 0.05), (1.0, 0.6)])), fill=(10, 10, 10))
        draw.line(_flat(_scale(box, [(0.25, 0.15), (0.85, 0.5)])), fill=(230, 30, 30), width=3)
        draw.line(_flat(_scale(box, [(0.25, 0.5), (0.85, 0.15)])), fill=(230, 30, 30), width=3)
    elif glyph == "bubble":
        draw.ellipse(_flat(_scale(box, [(0.0, 0.0), (1.0, 0.7)])), fill=(255, 255, 255), outline=dark)
        draw.polygon(_scale(box, [(0.2, 0.6), (0.4, 0.65), (0.1, 1.0)]), fill=(255, 255, 255))
        pts = [(x0 + w * (0.15 + 0.1 * k), y0 + h * (0.25 if k % 2 else 0.45)) for k in range(8)]
        draw.line(pts, fill=(220, 0, 0), width=2)
    elif glyph == "splatter":
        for _ in range(7):
            cx, cy = x0 + w * rng.uniform(0.15, 0.85), y0 + h * rng.uniform(0.15, 0.85)
            r = w * rng.uniform(0.06, 0.2)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(140, 0, 0))
    elif glyph == "cash":
        draw.ellipse(_flat(_scale(box, [(0.05, 0.25), (0.95, 1.0)])), fill=(120, 80, 40))
        draw.rectangle(_flat(_scale(box, [(0.25, 0.0), (0.75, 0.35)])), fill=(90, 170, 90), outline=(30, 90, 30))
        draw.text((x0 + w * 0.38, y0 + h * 0.45), "$", fill=(240, 220, 60))
    elif glyph == "drugs":
        draw.rectangle(_flat(_scale(box, [(0.1, 0.15), (0.9, 0.95)])), fill=(235, 235, 235), outline=dark)
        draw.polygon(_scale(box, [(0.5, 0.3), (0.65, 0.55), (0.5, 0.85), (0.35, 0.55)]), fill=(40, 150, 40))
    else:
        raise ValueError(f"unknown unsafe glyph {glyph}")


def _flat(points) -> tuple[float, float, float, float]:
    (ax, ay), (bx, by) = points
    return (ax, ay, bx, by)
