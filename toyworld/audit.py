"""Ground-truth checks of a build on the toy world: how well did scoring and mining do?

The toy world knows, for every unsafe record, the safe scene it was edited from and whether its given
(ViSU-like) partner is a deliberately wrong one. This module reads a finished work dir and measures the
pipeline against that truth; ``saferclip-data toy audit`` prints it.
"""

from __future__ import annotations

import numpy as np

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.safe_pool import pool_keys


def _source(workdir: WorkDir) -> dict[str, dict]:
    cols = ["key", "category", "role", "source_safe", "paired_safe", "objects", "place", "split"]
    rows = workdir.read_stage_columns("source", cols).to_pylist()
    return {r["key"]: r for r in rows}


def mining_figures(workdir: WorkDir, modality: str = "text") -> dict:
    """Precision@1 of mined targets against the ground-truth source scene (or a scene with the same caption
    content: same objects, colours and place), and, where the given pair is a noisy one, how often the mined
    top-1 is more similar to the query than the given pair.

    Precision counts only queries whose source scene is in the safe pool: one that the filter or dedup removed,
    or that sits in an excluded (benchmark) split, cannot be found by design; those are counted apart, and so are
    unsafe records that never reached mining (removed by the filter or dedup) or got no target in this modality,
    so that the four counts add up to the source's unsafe records.
    """
    from saferclip_data.stages.columns import column_part

    modality = column_part(modality)  # text-image, as recipes write it, is the column part text_image
    truth = _source(workdir)
    pool = set(pool_keys(workdir))
    mined = workdir.read_stage_columns("mine", ["key", "role", f"{modality}_targets", f"{modality}_margin"]).to_pylist()
    hits = total = beats = noisy = unreachable = without_targets = 0
    for row in mined:
        targets = row[f"{modality}_targets"]
        if row["role"] != "unsafe":
            continue
        if not targets:
            without_targets += 1
            continue
        gt = truth[row["key"]]
        source = truth.get(gt["source_safe"])
        top = truth[targets[0]]
        if source is None or source["key"] not in pool:
            unreachable += 1
        else:
            total += 1
            hits += top["key"] == source["key"] or (top["objects"], top["place"]) == (
                source["objects"],
                source["place"],
            )
        if gt["paired_safe"] != gt["source_safe"] and row[f"{modality}_margin"] is not None:
            noisy += 1
            beats += row[f"{modality}_margin"] > 0
    mined_keys = {row["key"] for row in mined}
    unsafe = [k for k, r in truth.items() if r["role"] == "unsafe"]
    return {
        "modality": modality,
        "unsafe_records": len(unsafe),
        "queries": total,
        "source_not_in_pool": unreachable,
        "removed_before_mining": sum(k not in mined_keys for k in unsafe),
        "without_targets": without_targets,
        "precision_at_1": hits / total if total else float("nan"),
        "noisy_pairs": noisy,
        "mined_beats_noisy_pair": beats / noisy if noisy else float("nan"),
    }


def scoring_auroc(workdir: WorkDir, min_records: int = 50) -> list[dict]:
    """Per category and modality: AUROC of the category's score, its unsafe records against all safe ones."""
    from saferclip_data.stages.columns import column_part
    from saferclip_data.toyworld.pretrain import auroc

    truth = _source(workdir)
    manifest = workdir.manifest("score") or {}
    categories = manifest.get("metadata", {}).get("categories", "").split("|")
    names = [f"{m}_score_{column_part(c)}" for c in categories for m in ("image", "text")]
    scores = workdir.read_stage_columns("score", ["key", *names])
    keys = scores["key"].to_pylist()
    role = np.array([truth[k]["role"] for k in keys], dtype=object)
    category = np.array([truth[k]["category"] for k in keys], dtype=object)
    out = []
    for c in categories:
        positive = (role == "unsafe") & (category == c)
        row = {"category": c, "unsafe_records": int(positive.sum())}
        for m in ("image", "text"):
            values = np.asarray(scores[f"{m}_score_{column_part(c)}"].fill_null(np.nan).to_numpy(), np.float64)
            pos, neg = values[positive], values[role == "safe"]
            pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
            enough = len(pos) >= min_records and len(neg) > 0
            row[f"{m}_auroc"] = auroc(pos, neg) if enough else float("nan")
        out.append(row)
    return out

