"""`bench scale`'s run over the sizes and its printed report (the measuring itself is in :mod:`bench.scale`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from saferclip_data.bench.scale import STAGES, growth, measure, save


def run_sizes(counts: list[int], dim: int, folder: Path, exact_dedup_max: int, executor: str, exact_sample: int,
              images: bool, edit_noise: float, cluster_size: int, keep: bool,
              log: Callable[[str], None]) -> list[dict]:  # fmt: skip
    """One child build per size, smallest first; scale.json rewritten after each; pools and work dirs removed
    unless ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for size in sorted(counts):
        log(f"building {size:,} records x {dim} dims ...")
        results.append(measure(size, dim, folder, exact_dedup_max, executor, exact_sample, images, edit_noise,
                               cluster_size))  # fmt: skip
        save(results, folder / "scale.json")
        if not keep:
            for sub in (f"pool-{size}", f"work-{size}", f"work-{size}-exact"):
                shutil.rmtree(folder / sub, ignore_errors=True)
    return results


def report(results: list[dict], folder: Path, executor: str, console: Any) -> None:
    """The per-stage table (seconds, peak MB, records/s, growth exponents), then each size's planted-truth line."""
    dim = results[0]["dim"]
    table = Table(title=f"bench scale: {dim}-d precomputed embeddings, built through shards ({executor} executor)")
    table.add_column("stage")
    for r in results:
        table.add_column(f"{r['records']:,}: s / peak MB / rec/s", justify="right")
    grown = growth(results)
    if grown:
        table.add_column("growth: time / memory", justify="right")
    for stage in STAGES:
        row = [stage] + [f"{r['stages'][stage]['seconds']:.1f} / {r['stages'][stage]['peak_rss_mb']:,.0f} / "
                         f"{r['stages'][stage]['records_per_s']:,}" for r in results]  # fmt: skip
        if grown:
            row.append(f"N^{grown[stage]['seconds']} / N^{grown[stage]['peak_rss_mb']}")
        table.add_row(*row)
    Console(width=max(Console().width, 120)).print(table)
    for r in results:
        _truth(r, console)
    console.print(f"results: {folder / 'scale.json'}")


def _truth(r: dict, console: Any) -> None:
    """One size's largest process, dedup recall, mining precision and how its targets were searched."""
    exact = r.get("dedup_recall_vs_exact")
    versus = f", of exact pairs {exact:.4f}" if exact is not None else ""
    other = next((f" ({k.removeprefix('mining_precision_at_1_')}: {v:.4f})" for k, v in r.items()
                  if k.startswith("mining_precision_at_1_")), "")  # fmt: skip
    top = max(STAGES, key=lambda stage: r["stages"][stage]["peak_rss_mb"])
    console.print(f"{r['records']:,}: largest process {r['peak_rss_mb']:,.0f} MB (during {top}: "
                  f"{r['stages'][top]['peak_process'] or '?'}); dedup recall of planted copies "
                  f"{r['dedup_planted_recall']:.4f}{versus}; mining precision@1 {r['mining_precision_at_1']:.4f}"
                  f"{other} over {r['mining_queries']:,} queries")  # fmt: skip
    if r.get("exact_sample_queries"):
        console.print(f"  exact search on {r['exact_sample_queries']:,} sampled queries: precision@1 "
                      f"{r['exact_sample_precision_at_1']:.4f} (the build's: {r['mining_precision_at_1']:.4f})")
    for modality, search in (r.get("target_search") or {}).items():
        probes = f", {search['nprobe']} of {search.get('lists')} lists probed" if search.get("nprobe") else ""
        recall = search.get("recall_at_1")
        measured = f", recall@1 measured {recall:.4f} on {search['recall_queries']:,} queries" if recall else ""
        if search.get("recall_at_1_configured") is not None:
            measured += (f" (probing the configured {search['nprobe_configured']}: "
                         f"{search['recall_at_1_configured']:.4f})")
        console.print(f"  {modality} targets: {search['index']} search{probes}{measured}")
