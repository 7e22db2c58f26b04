"""Published data-set layouts, turned into the source's uniform records (one row per caption/image).

- ``visu``: ViSU-Text (columns ``safe``, ``nsfw``, ``tag``, ``coco_id``): each row is a safe caption and its unsafe
  rewrite; the safe record gets the COCO image (from a local COCO folder, or a URL from a template, fetched by
  img2dataset), the unsafe one is text-only (ViSU-Text has no unsafe images).
- ``nsfwcaps``: NSFW-Caps (``image_coco_url``, ``caption``, ``nsfw_caption``, ``chosen_category``): the safe
  record has the COCO image URL, the unsafe caption is text-only.
- ``laion``: LAION-style parquet (``url``, ``caption``, ``punsafe``, ``similarity``): one record per row, its role
  from ``punsafe`` against a threshold; ``punsafe`` and ``similarity`` are carried along.

Both halves of a pair share a ``group``, the role goes to ``label`` (``safe``/``unsafe``) and the category to
``category``, so ``stages.score.role_column: label`` trains the probe and the benchmark finds the pairs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa

#: the source columns each layout needs in its file
REQUIRED = {
    "visu": ("safe", "nsfw", "tag", "coco_id"),
    "nsfwcaps": ("image_coco_url", "caption", "nsfw_caption", "chosen_category"),
    "laion": ("url", "caption"),
}
#: further columns a layout adds to every record (carried as source extra columns)
EXTRA = {"visu": ("split",), "nsfwcaps": ("split",), "laion": ("split", "punsafe", "similarity")}
COCO_URL = "http://images.cocodataset.org/train2017/{coco_id:012d}.jpg"
_DIGITS = re.compile(r"(\d+)$")


def coco_index(root: Path) -> dict[int, str]:
    """COCO image id -> file below ``root`` (``000000123456.jpg``, ``COCO_train2014_000000123456.jpg``, any depth)."""
    index: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and (m := _DIGITS.search(path.stem)):
            index.setdefault(int(m.group(1)), str(path))
    return index


def _check(table: pa.Table, layout: str, where: str) -> None:
    missing = [c for c in REQUIRED[layout] if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: layout {layout} needs column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})"
        )


def _pairs(rows: list[dict[str, Any]], prefix: str, split: str | None) -> pa.Table:
    """Rows of (safe caption, safe image, unsafe caption, category, row id) -> two records each."""
    out: dict[str, list] = {c: [] for c in ("key", "caption", "image", "group", "label", "category", "split")}
    for r in rows:
        group = f"{prefix}-{r['id']}"
        for role, caption, image in (("safe", r["safe"], r["image"]), ("unsafe", r["unsafe"], None)):
            out["key"].append(f"{group}-{role}")
            out["caption"].append(caption)
            out["image"].append(image)
            out["group"].append(group)
            out["label"].append(role)
            out["category"].append(r["category"] if role == "unsafe" else None)
            out["split"].append(r.get("split") or split)
    return pa.table({k: pa.array(v, pa.string()) for k, v in out.items()})


def expand(
    table: pa.Table,
    layout: str,
    where: str,
    *,
    split: str | None = None,
    coco_root: str | None = None,
    coco_url: str | None = None,
    punsafe_threshold: float = 0.5,
) -> pa.Table:
    """The records of a published layout (see the module docstring); ``where`` names the file in errors."""
    _check(table, layout, where)
    data = table.to_pylist()
    if layout == "visu":
        index = coco_index(Path(coco_root)) if coco_root else None

        def image_of(coco_id: Any) -> str | None:
            if coco_id in (None, ""):
                return None
            cid = int(coco_id)
            if index is not None:
                return index.get(cid)
            return coco_url.format(coco_id=cid) if coco_url else None

        rows = [{"id": f"{i:07d}", "safe": r["safe"], "unsafe": r["nsfw"], "image": image_of(r["coco_id"]),
                 "category": r["tag"], "split": r.get("split")} for i, r in enumerate(data)]  # fmt: skip
        return _pairs(rows, "visu", split)
    if layout == "nsfwcaps":
        rows = [{"id": f"{i:05d}", "safe": r["caption"], "unsafe": r["nsfw_caption"], "image": r["image_coco_url"],
                 "category": r["chosen_category"], "split": r.get("split")} for i, r in enumerate(data)]  # fmt: skip
        return _pairs(rows, "nsfwcaps", split)
    n = table.num_rows
    keys = (
        [str(k) for k in table["key"].to_pylist()]
        if "key" in table.column_names
        else [f"laion-{i:09d}" for i in range(n)]
    )
    punsafe = table["punsafe"].to_pylist() if "punsafe" in table.column_names else [None] * n
    similarity = table["similarity"].to_pylist() if "similarity" in table.column_names else [None] * n
    splits = table["split"].to_pylist() if "split" in table.column_names else [split] * n
    label = [None if p is None else ("unsafe" if float(p) >= punsafe_threshold else "safe") for p in punsafe]
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": table["caption"].cast(pa.string()),
        "image": table["url"].cast(pa.string()),
        "group": pa.array(keys, pa.string()),
        "label": pa.array(label, pa.string()),
        "category": pa.nulls(n, pa.string()),
        "split": pa.array(splits, pa.string()),
        "punsafe": pa.array(punsafe, pa.float64()),
        "similarity": pa.array(similarity, pa.float64()),
    })  # fmt: skip
