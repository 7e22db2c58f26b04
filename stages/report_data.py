"""The numbers of the audit report, computed with Polars over a work dir's parquet tables.

Every function takes the work dir and returns plain dicts / Polars frames; a stage that is absent gives an empty
section rather than an error, so ``saferclip-data report`` works on a partial build too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

BUCKET_ORDER = {"easy": 0, "medium": 1, "hard": 2}


def stage_frame(root: Path, stage: str, columns: list[str] | None = None) -> pl.DataFrame | None:
    """All kept records of a stage (its ``part-NNNNN.parquet`` files), or None when the stage has none."""
    files = sorted((root / stage).glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))
    if not files:
        return None
    frame = pl.scan_parquet(files)
    if columns is not None:
        present = [c for c in columns if c in frame.collect_schema().names()]
        frame = frame.select(present)
    return frame.collect()


def stage_counts(root: Path) -> list[dict]:
    """Per stage that ran, in the order they finished: status and counts; the report stage itself is the one
    writing this (it is not finished yet while it does)."""
    rows = []
    for manifest in sorted(root.glob("*/_manifest.json"), key=lambda p: p.stat().st_mtime_ns):
        m = json.loads(manifest.read_text())
        counts = m.get("counts", {})
        name = manifest.parent.name
        status = "done" if m.get("complete") else ("writing this report" if name == "report" else "unfinished")
        rows.append(
            {
                "stage": name,
                "status": status,
                "in": counts.get("in"),
                "out": counts.get("out"),
                "rejected": counts.get("rejected"),
                "partial": counts.get("partial", 0),
                "seconds": m.get("seconds"),
            }
        )
    return rows


def header(root: Path) -> dict:
    """Recipe name, build time, embedding model identity and package version, from the stage manifests."""
    manifests = [json.loads(p.read_text()) for p in sorted(root.glob("*/_manifest.json"))]
    embed = (
        json.loads((root / "embed" / "_manifest.json").read_text())
        if (root / "embed" / "_manifest.json").is_file()
        else {}
    )
    finished = [p.stat().st_mtime for p in root.glob("*/_manifest.json")]
    return {
        "recipe": next((m["recipe"] for m in manifests if m.get("recipe")), None),
        "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(finished))) if finished else None,
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model_identity": embed.get("metadata", {}).get("model_identity"),
        "version": next((m["packages"].get("saferclip-data") for m in manifests if m.get("packages")), None),
    }


def tertiles(root: Path) -> dict[str, list[float]]:
    """modality -> the two top-1 similarity thresholds between hard, medium and easy (mine stage metadata)."""
    path = root / "mine" / "_manifest.json"
    meta = json.loads(path.read_text()).get("metadata", {}) if path.is_file() else {}
    suffix = "_difficulty_tertiles"
    return {k.removesuffix(suffix): [float(x) for x in v.split(",")]
            for k, v in meta.items() if k.endswith(suffix)}  # fmt: skip


def rejects_by_reason(root: Path, kind: str = "rejects") -> pl.DataFrame:
    """Reject counts per stage and reason, counted lazily (only the two columns are read); ``kind`` "partial":
    the kept records that lost part of their output instead."""
    files = [f for f in sorted(root.glob(f"*/*{kind}.parquet")) if f.stat().st_size]
    if not files:
        return pl.DataFrame({"stage": [], "reason": [], "records": []}, schema_overrides={"records": pl.UInt32})
    counts = (
        pl.scan_parquet(files)
        .select("stage", "reason")
        .group_by("stage", "reason")
        .agg(pl.len().alias("records"))
        .sort(["stage", "records", "reason"], descending=[False, True, False])
        .collect()
    )
    return counts.with_columns(pl.col("records").cast(pl.UInt32))


def composition(root: Path) -> dict[str, list[dict]]:
    """Record counts per split, role and category of the source (whichever of those columns exist)."""
    source = stage_frame(root, "source", ["key", "split", "role", "label", "category"])
    if source is None:
        return {}
    out = {}
    for column in ("split", "role", "label", "category"):
        if column in source.columns and source[column].null_count() < source.height:
            counts = source.group_by(column).agg(pl.len().alias("records")).sort(column, nulls_last=True)
            out[column] = counts.with_columns(pl.col(column).fill_null("(none)")).to_dicts()
    return out


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of target reuse: 0 = every target used equally often, towards 1 = a few hubs."""
    if len(counts) == 0 or counts.sum() == 0:
        return float("nan")
    x = np.sort(counts.astype(np.float64))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def scores_and_roles(root: Path) -> pl.DataFrame | None:
    """Score columns of every scored record, with the filter's verdict (kept or not) and role."""
    score = stage_frame(root, "score", ["key", "alignment", "image_unsafe_score", "text_unsafe_score", "label_role"])
    if score is None:
        return None
    kept = stage_frame(root, "filter", ["key", "role"])
    if kept is None:
        return score.with_columns(pl.lit(None, pl.Utf8).alias("role"), pl.lit(False).alias("kept"))
    return score.join(kept.with_columns(pl.lit(True).alias("kept")), on="key", how="left").with_columns(
        pl.col("kept").fill_null(False), pl.coalesce("role", "label_role").alias("role")
    )


def target_search(root: Path) -> list[dict]:
    """Per mined modality how the nearest safe targets were searched (exact, or lists with the probe count) and
    the recall@1 against the exact search that the build measured on sampled queries."""
    manifest = root / "neighbours" / "_manifest.json"
    meta = json.loads(manifest.read_text()).get("metadata", {}) if manifest.is_file() else {}
    search = json.loads(meta.get("search", "{}"))
    return [{"modality": m, "index": s["index"], "lists probed": s.get("nprobe"), "lists": s.get("lists"),
             "recall@1 (measured)": s.get("recall_at_1"), "sampled queries": s.get("recall_queries"),
             "configured lists probed": s.get("nprobe_configured"),
             "recall@1 with those": s.get("recall_at_1_configured")}
            for m, s in sorted(search.items())]  # fmt: skip


def label_agreement(root: Path) -> list[dict]:
    """Per label (safe/unsafe) the records the source labelled, and how many the zero-shot scores alone would
    have given the same role (top unsafe score at or above the filter's ``unsafe_threshold``): a low agreement
    says the labels and the model disagree, whichever the filter followed."""
    score = stage_frame(root, "score", ["key", "label_role", "image_unsafe_score", "text_unsafe_score"])
    if score is None or "label_role" not in score.columns or score["label_role"].null_count() == score.height:
        return []
    manifest = root / "filter" / "_manifest.json"
    meta = json.loads(manifest.read_text()).get("metadata", {}) if manifest.is_file() else {}
    threshold = float(meta.get("unsafe_threshold", 0.5))
    names = [c for c in ("image_unsafe_score", "text_unsafe_score") if c in score.columns]
    scored = score.filter(pl.col("label_role").is_not_null()).with_columns(
        pl.max_horizontal(names).alias("top")).filter(pl.col("top").is_not_null())  # fmt: skip
    rows = []
    for role in ("safe", "unsafe"):
        part = scored.filter(pl.col("label_role") == role)
        if part.is_empty():
            continue
        scored_unsafe = int((part["top"] >= threshold).sum())
        same = scored_unsafe if role == "unsafe" else part.height - scored_unsafe
        rows.append({"label": role, "records": part.height, "scored unsafe": scored_unsafe,
                     "scored safe": part.height - scored_unsafe, "score threshold": threshold,
                     "agreement": same / part.height})  # fmt: skip
    return rows


def scorers(root: Path) -> list[dict]:
    """Per image classifier of the score stage: its scores by role, its agreement with the zero-shot image score
    of the same category, and its false-positive rate on the records labelled safe."""
    manifest = root / "score" / "_manifest.json"
    declared = json.loads(json.loads(manifest.read_text()).get("metadata", {}).get("classifiers", "{}")) \
        if manifest.is_file() else {}  # fmt: skip
    rows = []
    for column, spec in declared.items():
        zero_shot = "image_score_" + column.split("_", 1)[1]
        frame = stage_frame(root, "score", ["key", column, zero_shot, "label_role"])
        if frame is None or column not in frame.columns:
            continue
        scored = frame.filter(pl.col(column).is_not_null())
        threshold = spec["threshold"]
        row = {"classifier": column, "category": spec["category"], "threshold": threshold, "scored": scored.height}
        for role in ("safe", "unsafe"):
            part = scored.filter(pl.col("label_role") == role)[column]
            row[f"{role} records"] = part.len()
            row[f"{role} median"] = part.median() if part.len() else None
            row[f"{role} at or above threshold"] = float((part >= threshold).mean()) if part.len() else None
        row["false-positive rate (labelled safe)"] = row.pop("safe at or above threshold")
        if zero_shot in scored.columns:
            both = scored.filter(pl.col(zero_shot).is_not_null())
            row[f"rank correlation with {zero_shot}"] = both.select(
                pl.corr(column, zero_shot, method="spearman")).item() if both.height > 2 else None  # fmt: skip
            agree = (both[column] >= threshold) == (both[zero_shot] >= 0.5)
            row["same verdict as zero-shot (0.5)"] = float(agree.mean()) if both.height else None
        rows.append(row)
    return rows


def mining(root: Path) -> dict:
    """Per mined modality: top-1 similarities, similarity by rank, difficulty, margin over the given pair, reuse."""
    path = root / "mine" / "targets.parquet"
    files = sorted((root / "mine").glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))
    if not files or not path.is_file():
        return {}
    targets = pl.scan_parquet(path)  # lazily: only the aggregates below are materialised
    out = {}
    for modality in targets.select("modality").unique().sort("modality").collect()["modality"].to_list():
        t = targets.filter(pl.col("modality") == modality)
        m = modality.replace("-", "_")
        by_rank = (t.group_by("rank").agg(pl.col("similarity").mean().alias("mean"), pl.len().alias("n"))
                   .sort("rank").collect())  # fmt: skip
        reuse = t.group_by("target").agg(pl.len().alias("uses")).collect()["uses"].to_numpy()
        columns = [f"{m}_similarities", f"{m}_pair_similarity", f"{m}_difficulty"]
        queries = (pl.scan_parquet(files).filter(pl.col(f"{m}_targets").is_not_null()).select(columns)
                   .collect())  # fmt: skip
        top1 = queries[f"{m}_similarities"].list.first().cast(pl.Float64)
        pair = queries[f"{m}_pair_similarity"].cast(pl.Float64)
        has_pair = pair.is_not_null()
        out[modality] = {
            "queries": queries.height,
            "top1": top1.to_numpy(),
            "by_rank": by_rank.to_dicts(),
            "difficulty": sorted(
                queries.group_by(f"{m}_difficulty")
                .agg(pl.len().alias("n"))
                .rename({f"{m}_difficulty": "bucket"})
                .to_dicts(),
                key=lambda d: BUCKET_ORDER.get(d["bucket"], 9),
            ),
            "reuse": reuse,
            "reuse_gini": gini(reuse),
            "reuse_max": int(reuse.max()) if len(reuse) else 0,
            "distinct_targets": len(reuse),
            "pair": pair.filter(has_pair).to_numpy(),
            "pair_top1": top1.filter(has_pair).to_numpy(),
        }
    return out


def benchmark(root: Path) -> dict:
    sheet = root / "benchmark" / "datasheet.json"
    if not sheet.is_file():
        return {}
    data = json.loads(sheet.read_text())
    leaks = root / "benchmark" / "leakage.parquet"
    data["leak_rows"] = pl.read_parquet(leaks).head(50).to_dicts() if leaks.is_file() else []
    return data


def sample_pairs(root: Path, modality: str, n: int = 12) -> list[dict]:
    """Unsafe records with their top-1 mined target: every category, each over the difficulty buckets in turn
    (easy, medium, hard; each category starting one bucket later), the records of a (category, bucket) cell at
    the median of its similarity, so the table shows typical pairs, neither the best nor the weakest. At least
    one per category, whatever ``n``."""
    m = modality.replace("-", "_")
    files = sorted((root / "mine").glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))
    if not files or f"{m}_targets" not in pl.scan_parquet(files).collect_schema().names():
        return []
    mine = (
        pl.scan_parquet(files)
        .filter(pl.col(f"{m}_targets").is_not_null())
        .select("key", pl.col("category").fill_null("unknown"),
                pl.col(f"{m}_targets").list.first().alias("target"),
                pl.col(f"{m}_similarities").list.first().alias("similarity"),
                pl.col(f"{m}_difficulty").alias("difficulty"))
        .collect()
    )  # fmt: skip
    if mine.is_empty():
        return []
    categories = sorted(mine["category"].unique().to_list())
    per_category = max(1, -(-n // len(categories)))
    chosen = []
    for c, category in enumerate(categories):
        rows = mine.filter(pl.col("category") == category)
        cells = {b: rows.filter(pl.col("difficulty") == b).sort("similarity", "key") for b in BUCKET_ORDER}
        taken: dict[str, int] = dict.fromkeys(BUCKET_ORDER, 0)
        first = len(chosen)
        for i in range(per_category):
            turn = (i + c) % 3  # categories start on different buckets: every bucket shows even at n = 2/category
            bucket = next((b for b in list(BUCKET_ORDER)[turn:] + list(BUCKET_ORDER)[:turn]
                           if taken[b] < cells[b].height), None)  # fmt: skip
            if bucket is None:
                break
            cell = cells[bucket]
            middle = (cell.height - 1) // 2
            offset = (taken[bucket] + 1) // 2 * (1 if taken[bucket] % 2 else -1)  # median, then either side
            chosen.append(cell.row(min(max(middle + offset, 0), cell.height - 1), named=True))
            taken[bucket] += 1
        chosen[first:] = sorted(chosen[first:], key=lambda r: (BUCKET_ORDER[r["difficulty"]], -r["similarity"]))
    keys = {r["key"] for r in chosen} | {r["target"] for r in chosen}
    source_files = sorted((root / "source").glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))
    source = pl.scan_parquet(source_files).filter(pl.col("key").is_in(list(keys))).select("key", "caption", "image")
    lookup = {r["key"]: r for r in source.collect().to_dicts()}
    scored = unsafe_scores(root, {r["target"] for r in chosen})
    out = []
    for r in chosen:
        unsafe, target = lookup.get(r["key"], {}), lookup.get(r["target"], {})
        out.append({**r, "unsafe_caption": unsafe.get("caption"), "unsafe_image": unsafe.get("image"),
                    "target_caption": target.get("caption"), "target_image": target.get("image"),
                    "target_unsafe_score": scored.get(r["target"])})  # fmt: skip
    return out


def unsafe_scores(root: Path, keys: set[str]) -> dict[str, float]:
    """key -> the higher of its image and text unsafe score (score stage), for these keys."""
    files = sorted((root / "score").glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))
    if not files or not keys:
        return {}
    frame = pl.scan_parquet(files)
    names = [c for c in ("image_unsafe_score", "text_unsafe_score") if c in frame.collect_schema().names()]
    if not names:
        return {}
    picked = frame.filter(pl.col("key").is_in(list(keys))).select("key", pl.max_horizontal(names).alias("s"))
    return {r["key"]: r["s"] for r in picked.collect().to_dicts() if r["s"] is not None}
