"""The audit report: a self-contained HTML page (plots embedded as PNG), a Markdown summary and JSON stats.

Built from the work dir alone (Polars over its parquet tables, see ``report_data``), by the ``report`` stage at
the end of a build or by ``saferclip-data report WORKDIR`` at any time. Unsafe thumbnails are blurred unless
``show_unsafe`` is set: the report is meant to be shared.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from saferclip_data.models.decode import to_rgb
from saferclip_data.pipeline.stage import GlobalContext, GlobalOutput, Stage, StageConfig
from saferclip_data.pipeline.workdir import atomic_write_text
from saferclip_data.stages.report_render import render_html, render_markdown

BLUR_RADIUS = 6
#: a mined (safe) target whose unsafe score reaches this is blurred in the report like an unsafe image
TARGET_BLUR_SCORE = 0.5
THUMB = 96


class ReportConfig(StageConfig):
    show_unsafe: bool = Field(default=False, description="show unsafe thumbnails unblurred")
    samples: int = Field(default=12, ge=0, description="pairs in the sample table")
    modality: str = Field(default="text", description="mined modality of the sample table")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")  # no display; PNGs only
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(5.5 if columns == 1 else 9, 3.2))


def thumbnail(image: bytes | None, blur: bool) -> str | None:
    """A small PNG (base64) of encoded image bytes; blurred when it shows unsafe content."""
    if not image:
        return None
    from PIL import Image, ImageFilter

    img = to_rgb(Image.open(io.BytesIO(image)))
    img.thumbnail((THUMB, THUMB))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(root: Path, stats: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) of every plot the work dir supports."""
    from saferclip_data.stages import report_data as data  # polars: imported only where a report is made

    plots = []
    scores = data.scores_and_roles(root)
    if scores is not None:
        for column in ("image_unsafe_score", "text_unsafe_score"):
            if column not in scores.columns:
                continue
            fig, ax = _figure()
            bins = np.linspace(0, 1, 41)
            before = scores[column].drop_nulls().to_numpy()
            after = scores.filter(scores["kept"])[column].drop_nulls().to_numpy()
            ax.hist(before, bins=bins, alpha=0.5, label=f"scored ({len(before):,})")
            ax.hist(after, bins=bins, alpha=0.5, label=f"kept by filter ({len(after):,})")
            ax.set_xlabel(column)
            ax.set_ylabel("records")
            ax.legend()
            plots.append((f"{column}: before and after thresholds", _png(fig)))
        if "alignment" in scores.columns:
            fig, ax = _figure()
            for role in ("safe", "unsafe"):
                values = scores.filter(scores["role"] == role)["alignment"].drop_nulls().to_numpy()
                if len(values):
                    ax.hist(values, bins=40, alpha=0.5, label=f"{role} ({len(values):,})")
            ax.set_xlabel("image-caption cosine")
            ax.legend()
            plots.append(("image-caption alignment by role", _png(fig)))
    for modality, m in stats.get("mining_arrays", {}).items():
        plots += _mining_plots(modality, m, stats.get("tertiles", {}).get(modality))
    return plots


def _mining_plots(modality: str, m: dict, cuts: list[float] | None) -> list[tuple[str, str]]:
    """One mined modality's plots: similarity by rank, target reuse, given pair vs mined, difficulty cuts."""
    plots = []
    fig, (a1, a2) = _figure(columns=2)
    a1.hist(m["top1"], bins=40)
    a1.set_xlabel("top-1 target similarity")
    ranks = [r["rank"] for r in m["by_rank"]]
    a2.plot(ranks, [r["mean"] for r in m["by_rank"]], marker="o")
    a2.set_xlabel("rank")
    a2.set_ylabel("mean similarity")
    plots.append((f"mined targets ({modality}): similarity and rank", _png(fig)))
    fig, ax = _figure()
    ax.hist(m["reuse"], bins=range(1, int(m["reuse"].max()) + 2) if len(m["reuse"]) else 10)
    ax.set_xlabel("times a safe record is a target")
    ax.set_ylabel("safe records")
    ax.set_title(f"Gini {m['reuse_gini']:.3f}")
    plots.append((f"target reuse ({modality})", _png(fig)))
    if len(m["pair"]):
        fig, ax = _figure()
        ax.scatter(m["pair"], m["pair_top1"], s=4, alpha=0.4)
        low = float(min(m["pair"].min(), m["pair_top1"].min()))
        ax.plot([low, 1], [low, 1], color="grey", linewidth=1)
        ax.set_xlabel("given pair similarity")
        ax.set_ylabel("mined top-1 similarity")
        plots.append((f"given pair vs mined target ({modality})", _png(fig)))
    if cuts and len(m["top1"]):
        fig, ax = _figure()
        ax.hist(m["top1"], bins=50, color="#9ab")
        for cut, label, height in zip(cuts, ("hard | medium", "medium | easy"), (0.62, 0.88)):
            ax.axvline(cut, color="#c33", linewidth=1.5)
            ax.annotate(f"{label}\n{cut:.3f}", (cut, ax.get_ylim()[1] * height), ha="center", fontsize=8,
                        backgroundcolor="white")  # fmt: skip
        ax.set_xlabel("top-1 target similarity (curriculum: easy first, hard last)")
        ax.set_ylabel("unsafe records")
        plots.append((f"difficulty thresholds ({modality}): tertiles of top-1 similarity", _png(fig)))
    return plots


def collect(root: Path) -> dict[str, Any]:
    """All report numbers as JSON-ready values (arrays summarised), plus the raw arrays under mining_arrays."""
    from saferclip_data.stages import report_data as data  # polars: imported only where a report is made

    mining = data.mining(root)
    summary = {}
    for modality, m in mining.items():
        margin = m["pair_top1"] - m["pair"] if len(m["pair"]) else np.array([])
        summary[modality] = {
            "queries": m["queries"],
            "top1_similarity_mean": float(np.mean(m["top1"])) if len(m["top1"]) else None,
            "mean_similarity_by_rank": m["by_rank"],
            "difficulty": m["difficulty"],
            "distinct_targets": m["distinct_targets"],
            "reuse_max": m["reuse_max"],
            "reuse_gini": m["reuse_gini"],
            "mined_beats_given_pair": float((margin > 1e-6).mean()) if len(margin) else None,
            "mined_is_given_pair": float((np.abs(margin) <= 1e-6).mean()) if len(margin) else None,
        }
    rejects = data.rejects_by_reason(root)
    return {
        "header": data.header(root),
        "tertiles": data.tertiles(root),
        "work_dir": str(root),
        "stages": data.stage_counts(root),
        "composition": data.composition(root),
        "rejects_by_reason": rejects.to_dicts(),
        "partial_by_reason": data.rejects_by_reason(root, "partial").to_dicts(),
        "mining": summary,
        "benchmark": data.benchmark(root),
        "scorers": data.scorers(root),
        "label_agreement": data.label_agreement(root),
        "target_search": data.target_search(root),
        "mining_arrays": mining,
    }


def write_report(
    root: Path, out: Path | None = None, show_unsafe: bool = False, samples: int = 12, modality: str = "text"
) -> Path:
    """Write report.html, report.md and report.json into ``out`` (default: <workdir>/report); returns the HTML path."""
    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    stats = collect(root)
    plots = _plots(root, stats)
    from saferclip_data.stages import report_data as data

    rows = data.sample_pairs(root, modality, samples)
    for r in rows:
        r["unsafe_thumb"] = thumbnail(r.pop("unsafe_image"), blur=not show_unsafe)
        # a safe target the model still finds unsafe-looking is blurred too (it was picked as a safe record)
        risky = (r.get("target_unsafe_score") or 0.0) >= TARGET_BLUR_SCORE
        r["target_thumb"] = thumbnail(r.pop("target_image"), blur=risky and not show_unsafe)
    stats.pop("mining_arrays")
    stats["plots"] = [title for title, _ in plots]
    shown = ("key", "category", "target", "similarity", "difficulty", "target_unsafe_score")
    stats["samples"] = [{k: r.get(k) for k in shown} for r in rows]
    stats["unsafe_thumbnails"] = "shown" if show_unsafe else "blurred"
    atomic_write_text(out / "report.html", render_html(stats, plots, rows, show_unsafe))
    atomic_write_text(out / "report.md", render_markdown(stats))
    atomic_write_text(out / "report.json", json.dumps(stats, indent=2, default=str) + "\n")
    return out / "report.html"


class ReportStage(Stage):
    name = "report"
    Config = ReportConfig
    mode = "global"
    inputs = {"mine": ("key",)}
    after = ("benchmark", "shards")  # reported when the recipe has them
    output_columns = ()
    version = "1"

    config: ReportConfig

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        c = self.config
        write_report(ctx.workdir.root, show_unsafe=c.show_unsafe, samples=c.samples, modality=c.modality)
        n = sum(ctx.workdir.shard_stats("mine", s)["out"] for s in ctx.workdir.completed_shards("mine"))
        return GlobalOutput({"in": n, "out": n, "rejected": 0})
