"""Exports of the benchmark stage: a parquet table, clip_benchmark-style WebDataset retrieval sets, the leakage
table and a datasheet (JSON + Markdown) with the sha256 of every exported file.

Layout, under ``<workdir>/benchmark/``::

    benchmark.parquet         one row per quadruplet: keys, captions, category, alignments, similarities
    leakage.parquet           training records too close to (or sharing a group with) a benchmark record
    export/safe/, export/unsafe/
        dataset_type.txt      "retrieval" (clip_benchmark's wds loader reads it)
        test/nshards.txt, test/0.tar, ...   samples: <benchmark_id>.jpg|png|webp, .txt (caption), .json (roles)
    datasheet.json, datasheet.md

clip_benchmark's WebDataset loader expects ``<root>/<split>/nshards.txt`` and ``{0..n-1}.tar`` whose samples
have an image member and a ``txt`` member (one caption per line); the ``json`` member carries our role keys and
is ignored by it. Tars are written with fixed member times, so the same selection gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from saferclip_data.pipeline.stage import GlobalContext, Stage
from saferclip_data.pipeline.workdir import atomic_path, atomic_write_text
from saferclip_data.stages.samples import image_extension, sha256_file, source_rows

SAMPLES_PER_TAR = 1000
LEAK_SCHEMA = pa.schema(
    [
        ("benchmark_id", pa.string()),
        ("benchmark_key", pa.string()),
        ("modality", pa.string()),
        ("training_key", pa.string()),
        ("cosine", pa.float32()),
    ]
)


def _write_retrieval_set(folder: Path, samples: list[tuple[str, bytes, str, dict]]) -> list[Path]:
    import webdataset as wds

    test = folder / "test"
    test.mkdir(parents=True, exist_ok=True)
    written = []
    shards = [samples[i : i + SAMPLES_PER_TAR] for i in range(0, len(samples), SAMPLES_PER_TAR)] or [[]]
    for n, chunk in enumerate(shards):
        final = test / f"{n}.tar"
        with atomic_path(final) as tmp, wds.TarWriter(str(tmp), mtime=0, user="saferclip", group="saferclip",
                                                      mode=0o444) as writer:  # fmt: skip
            for key, image, caption, meta in chunk:
                writer.write({"__key__": key, image_extension(image): image, "txt": caption, "json": meta})
        written.append(final)
    atomic_write_text(test / "nshards.txt", f"{len(shards)}\n")
    atomic_write_text(folder / "dataset_type.txt", "retrieval\n")
    return [*written, test / "nshards.txt", folder / "dataset_type.txt"]


def export_benchmark(
    ctx: GlobalContext,
    stage: Stage,
    rows: list[dict],
    leaks: list[dict],
    per_category: dict[str, dict],
    thresholds: dict[str, float],
    metadata: dict[str, str],
) -> None:
    wd = ctx.workdir
    folder = wd.stage_dir(stage.name)
    sources = source_rows(ctx.workdir, {r["safe_key"] for r in rows} | {r["unsafe_key"] for r in rows})
    table_rows = []
    sets: dict[str, list[tuple[str, bytes, str, dict]]] = {"safe": [], "unsafe": []}
    for r in rows:
        safe, unsafe = sources[r["safe_key"]], sources[r["unsafe_key"]]
        table_rows.append(
            {
                "benchmark_id": r["benchmark_id"],
                "group": r["group"],
                "category": r["category"],
                "safe_key": r["safe_key"],
                "unsafe_key": r["unsafe_key"],
                "safe_caption": safe["caption"],
                "unsafe_caption": unsafe["caption"],
                "safe_alignment": r["safe_alignment"],
                "unsafe_alignment": r["unsafe_alignment"],
                "caption_similarity": r["caption_similarity"],
                "image_similarity": r["image_similarity"],
            }
        )
        for role, rec, partner in (("safe", safe, unsafe), ("unsafe", unsafe, safe)):
            meta = {
                "benchmark_id": r["benchmark_id"],
                "role": role,
                "key": rec["key"],
                "partner_key": partner["key"],
                "category": r["category"],
            }
            sets[role].append((f"{r['benchmark_id']}-{role}", rec["image"], rec["caption"], meta))
    ctx.write_table("benchmark", pa.Table.from_pylist(table_rows) if table_rows else pa.table({}), metadata)
    ctx.write_table("leakage", pa.Table.from_pylist(leaks, schema=LEAK_SCHEMA), metadata)
    exported = [folder / "benchmark.parquet", folder / "leakage.parquet"]
    for role, samples in sets.items():
        exported += _write_retrieval_set(folder / "export" / role, samples)
    sheet = datasheet(ctx, stage, table_rows, leaks, per_category, thresholds, exported)
    atomic_write_text(folder / "datasheet.json", json.dumps(sheet, indent=2) + "\n")
    atomic_write_text(folder / "datasheet.md", datasheet_markdown(sheet))


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, np.float64)
    return {k: round(float(v), 4) for k, v in {"mean": a.mean(), "min": a.min(), "median": np.median(a),
                                                "max": a.max()}.items()}  # fmt: skip


def datasheet(ctx, stage, rows, leaks, per_category, thresholds, exported: list[Path]) -> dict:
    wd = ctx.workdir
    manifest = wd.manifest(stage.name) or {}
    source = stage.sections.get("source")
    root = wd.stage_dir(stage.name)
    return {
        "name": "NSFW-Caps-style benchmark",
        "recipe_fingerprint": manifest.get("fingerprint"),
        "source": source.model_dump(mode="json", include={"kind", "path", "toy"}) if source is not None else None,
        "model": (wd.manifest("embed") or {}).get("metadata", {}).get("model_identity"),
        # how the training pool's nearest safe targets were searched, with the recall@1 the build measured
        "target_search": json.loads((wd.manifest("neighbours") or {}).get("metadata", {}).get("search", "null")),
        "settings": stage.config.fingerprint_dict(),
        "thresholds": thresholds,
        "quadruplets": len(rows),
        "per_category": per_category,
        "similarity": {
            "caption_safe_unsafe": _stats([r["caption_similarity"] for r in rows]),
            "image_safe_unsafe": _stats([r["image_similarity"] for r in rows]),
            "alignment_safe": _stats([r["safe_alignment"] for r in rows]),
            "alignment_unsafe": _stats([r["unsafe_alignment"] for r in rows]),
        },
        "leakage": {
            "findings": len(leaks),
            "by_modality": {m: sum(x["modality"] == m for x in leaks) for m in ("group", "image", "text")},
            "table": "leakage.parquet",
        },
        "files": {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in exported},
    }


def datasheet_markdown(sheet: dict) -> str:
    lines = [
        f"# {sheet['name']}",
        "",
        f"- quadruplets: **{sheet['quadruplets']}**; recipe fingerprint `{sheet['recipe_fingerprint']}`",
        f"- source: `{json.dumps(sheet['source'])}`; model: `{sheet['model']}`",
        f"- thresholds: {', '.join(f'{k} ≥ {v:.4f}' for k, v in sheet['thresholds'].items())}",
        f"- leakage findings: {sheet['leakage']['findings']} ({sheet['leakage']['by_modality']})",
    ]
    for modality, search in (sheet.get("target_search") or {}).items():
        recall = search.get("recall_at_1")
        lines.append(f"- training targets ({modality}): {search['index']} search"
                     + (f", {search['nprobe']} lists probed" if search.get("nprobe") else "")
                     + (f", recall@1 {recall:.4f} on {search['recall_queries']:,} sampled queries" if recall else ""))
    lines += [
        "",
    ]
    avoided = any("near_training_skipped" in c for c in sheet["per_category"].values())
    lines += ["| category | candidates | eligible | quota | selected | shortfall | near-duplicates skipped |"
              + (" near training, skipped |" if avoided else ""), "|---|---:|---:|---:|---:|---:|---:|"
              + ("---:|" if avoided else "")]  # fmt: skip
    for cat, c in sheet["per_category"].items():
        lines.append(
            f"| {cat} | {c['candidates']} | {c['eligible']} | {c['quota']} | {c['selected']} | {c['shortfall']} "
            f"| {c['near_duplicates_skipped']} |" + (f" {c.get('near_training_skipped', 0)} |" if avoided else "")
        )
    lines += ["", "| similarity | mean | min | median | max |", "|---|---:|---:|---:|---:|"]
    for name, s in sheet["similarity"].items():
        if s:
            lines.append(f"| {name} | {s['mean']} | {s['min']} | {s['median']} | {s['max']} |")
    lines += ["", "| file | sha256 | bytes |", "|---|---|---:|"]
    lines += [f"| {p} | `{f['sha256']}` | {f['bytes']} |" for p, f in sheet["files"].items()]
    return "\n".join(lines) + "\n"
