"""Difficulty buckets of the easy-to-hard schedule: tertiles of each unsafe record's top-1 target similarity."""

from __future__ import annotations

import numpy as np


def bucket_of(top1: float, low: float, high: float) -> str:
    """easy (the most similar third: at or above ``high``), medium, or hard (below ``low``)."""
    return "easy" if top1 >= high else "medium" if top1 >= low else "hard"


def difficulty(top1: np.ndarray) -> tuple[list[str], tuple[float, float]]:
    """easy / medium / hard by tertiles of top-1 similarity, and the two thresholds."""
    if len(top1) == 0:
        return [], (float("nan"), float("nan"))
    low, high = (float(v) for v in np.quantile(top1, [1 / 3, 2 / 3]))
    return [bucket_of(s, low, high) for s in top1], (low, high)
