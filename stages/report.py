"""The audit report: a self-contained HTML page (plots embedded as PNG), a Markdown summary and JSON stats.

Built from the work dir alone (Polars over its parquet tables, see ``report_data``), by the ``report`` stage at
the end of a build or by ``saferclip-data report WORKDIR`` at any time. Unsafe thumbnails are blurred unless
``show_unsafe`` is set: the report is meant to be shared.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from saferclip_data.models.decode import to_rgb
from saferclip_data.pipeline.stage import GlobalContext, GlobalOutput, Stage, StageConfig

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
        cuts = stats.get("tertiles", {}).get(modality)
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


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;background:#f4f6f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
header{background:#1d2a3a;color:#fff;padding:22px 32px}
header h1{margin:0 0 6px;font-size:24px;font-weight:600}
header dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:8px 0 0;font-size:13px}
header dt{color:#9fb0c4} header dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 10px} h3{font-size:15px;margin:14px 0 6px;color:#394b60}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th{background:#eef2f6;text-align:left;font-weight:600;padding:5px 10px;border-bottom:2px solid #cfd8e2}
td{padding:4px 10px;border-bottom:1px solid #e8edf2;vertical-align:middle}
tr:nth-child(even) td{background:#fafbfd} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
figure{display:inline-block;margin:6px 10px 6px 0} figcaption{font-size:12px;color:#4a5a6c}
img.plot{max-width:540px;border:1px solid #e3e8ee;border-radius:4px}
img.unsafe-thumb,img.safe-thumb{width:72px;height:72px;object-fit:cover;border-radius:4px}
.empty{color:#8a96a3} .note{color:#4a5a6c;font-size:13px}
"""

#: column names as shown (others: underscores become spaces)
HEADINGS = {"in": "records in", "out": "kept", "partial": "partial output",
            "near_duplicates_skipped": "near-duplicates skipped",
            "top1_similarity_mean": "mean top-1 similarity", "reuse_gini": "reuse Gini", "reuse_max": "most uses",
            "mined_beats_given_pair": "mined beats given pair", "mined_is_given_pair": "mined is given pair",
            "seconds": "seconds"}  # fmt: skip


def _heading(column: str) -> str:
    return HEADINGS.get(column, column.replace("_", " "))


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class='empty'>none</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(_heading(str(c)))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c), c) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any, column: str) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    text = f"{value:,.1f}" if column == "seconds" and numeric else _fmt(value)
    return f"<td class='num'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _header(stats: dict) -> str:
    h = stats["header"]
    facts = [("recipe", h.get("recipe") or "(not recorded)"), ("built", h.get("built") or ""),
             ("report written", h.get("written")), ("embedding model", h.get("model_identity") or "(none)"),
             ("saferclip-data", h.get("version") or ""), ("work dir", stats["work_dir"])]  # fmt: skip
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts)
    return f"<header><h1>saferclip-data audit report</h1><dl>{rows}</dl></header>"


def render_html(stats: dict, plots: list[tuple[str, str]], samples: list[dict], show_unsafe: bool) -> str:
    bench = stats["benchmark"]
    shown = ("in", "out", "rejected", "partial", "seconds")
    stages = [{"stage": s["stage"], "status": s["status"], **{k: s[k] for k in shown}} for s in stats["stages"]]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>saferclip-data report: {html.escape(str(stats['header'].get('recipe') or ''))}</title>",
        f"<style>{STYLE}</style></head><body>",
        _header(stats),
        "<main><section><h2>Stages</h2>",
        _table(stages),
        "</section><section><h2>Composition</h2><div class='grid'>",
    ]
    for column, rows in stats["composition"].items():
        parts += [f"<div><h3>by {html.escape(column)}</h3>", _table(rows), "</div>"]
    parts += ["</div></section><section><h2>Rejects by stage and reason</h2>", _table(stats["rejects_by_reason"])]
    parts += ["<h3>Kept, but part of their output is missing</h3>", _table(stats["partial_by_reason"])]
    if stats["label_agreement"]:
        parts += ["</section><section><h2>Labels vs scores</h2><p class='note'>Records the source labelled, and "
                  "how many the zero-shot scores alone would give the same role.</p>",
                  _table(stats["label_agreement"])]  # fmt: skip
    if stats["scorers"]:
        parts += ["</section><section><h2>Image classifiers</h2><p class='note'>Scores by the records' labels, "
                  "agreement with the zero-shot score of the same category, false positives on records labelled "
                  "safe.</p>", _table(stats["scorers"])]  # fmt: skip
    parts += [
        "</section><section><h2>Mining</h2>",
        _table(
            [
                {"modality": k, **{x: y for x, y in v.items() if not isinstance(y, list)}}
                for k, v in stats["mining"].items()
            ]
        ),
        "<h3>Nearest-target search</h3><p class='note'>Recall@1 against the exact search, measured by the build "
        "on sampled queries; an approximate search probes lists until it reaches the recipe's min_recall.</p>",
        _table(stats["target_search"]),
        "</section><section><h2>Plots</h2>",
    ]
    for title, png in plots:
        alt = html.escape(title)
        parts.append(
            f"<figure><img class='plot' alt='{alt}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{alt}</figcaption></figure>"
        )
    parts.append("</section><section><h2>Benchmark datasheet</h2>")
    if bench:
        parts.append(
            f"<p>{bench['quadruplets']:,} quadruplets; recipe fingerprint "
            f"<code>{html.escape(str(bench['recipe_fingerprint']))}</code></p><h3>Thresholds</h3>"
        )
        parts.append(_table([{"threshold": _heading(k), "value": v} for k, v in bench["thresholds"].items()]))
        parts.append("<h3>Per category</h3>")
        parts.append(_table([{"category": k, **v} for k, v in bench["per_category"].items()]))
        parts.append("<h3>Pair similarity</h3>")
        parts.append(_table([{"similarity": _heading(k), **v} for k, v in bench["similarity"].items() if v]))
        parts.append(f"<h3>Leakage findings: {bench['leakage']['findings']:,}</h3>")
        parts.append(_table(bench["leak_rows"]))
    else:
        parts.append("<p class='empty'>no benchmark stage in this work dir</p>")
    note = "shown unblurred (--show-unsafe)" if show_unsafe else "blurred; --show-unsafe shows them"
    parts.append(
        f"</section><section><h2>Sample pairs</h2><p class='note'>Every category, over the difficulty buckets, "
        f"pairs of typical similarity in each. Unsafe images are {note}.</p><table><thead><tr><th>category</th>"
        "<th>difficulty</th><th>unsafe</th><th>caption</th><th>mined safe target</th><th>caption</th>"
        "<th>similarity</th></tr></thead><tbody>"
    )
    for s in samples:
        cells = []
        for image, cls in ((s["unsafe_thumb"], "unsafe-thumb"), (s["target_thumb"], "safe-thumb")):
            cells.append(f"<img class='{cls}' alt='{cls}' src='data:image/png;base64,{image}'>" if image else "")
        parts.append(
            f"<tr><td>{html.escape(str(s['category']))}</td><td>{html.escape(str(s['difficulty']))}</td>"
            f"<td>{cells[0]}</td><td>{html.escape(s['unsafe_caption'] or '')}</td><td>{cells[1]}</td>"
            f"<td>{html.escape(s['target_caption'] or '')}</td><td class='num'>{_fmt(s['similarity'])}</td></tr>"
        )
    parts.append("</tbody></table></section></main></body></html>")
    return "\n".join(parts)


def render_markdown(stats: dict) -> str:
    lines = ["# saferclip-data report", "", "| stage | in | out | rejected |", "|---|---:|---:|---:|"]
    lines += [f"| {s['stage']} | {_fmt(s['in'])} | {_fmt(s['out'])} | {_fmt(s['rejected'])} |" for s in stats["stages"]]
    lines += ["", "## Rejects by reason", ""]
    lines += [f"- {r['stage']}: {r['reason']} — {r['records']:,}" for r in stats["rejects_by_reason"]] or ["- none"]
    if stats["partial_by_reason"]:
        lines += ["", "## Kept, but part of their output is missing", ""]
        lines += [f"- {r['stage']}: {r['reason']} — {r['records']:,}" for r in stats["partial_by_reason"]]
    if stats["label_agreement"]:
        lines += ["", "## Labels vs scores", ""]
        lines += [f"- labelled {r['label']}: {r['records']:,} records, the scores agree on {r['agreement']:.1%} "
                  f"({r['scored unsafe']:,} score unsafe at {r['score threshold']:g})"
                  for r in stats["label_agreement"]]  # fmt: skip
    for c in stats["scorers"]:
        fp = c["false-positive rate (labelled safe)"]
        lines += ["", f"## Image classifier {c['classifier']}", "",
                  f"- {c['scored']:,} images scored; threshold {c['threshold']}; false-positive rate on records "
                  f"labelled safe: {'-' if fp is None else f'{fp:.1%}'} of {c['safe records']:,}"]  # fmt: skip
    for modality, m in stats["mining"].items():
        beats = m["mined_beats_given_pair"]
        lines += [
            "",
            f"## Mining ({modality})",
            "",
            f"- {m['queries']:,} unsafe records with targets; mean top-1 similarity {_fmt(m['top1_similarity_mean'])}",
            f"- {m['distinct_targets']:,} distinct targets, reuse max {m['reuse_max']}, Gini {_fmt(m['reuse_gini'])}",
        ]
        if beats is not None:
            lines.append(
                f"- mined top-1 more similar than the given pair in {beats:.1%}; it is the given pair itself in "
                f"{m['mined_is_given_pair']:.1%}"
            )
    for s in stats["target_search"]:
        recall = s["recall@1 (measured)"]
        lines.append(f"- nearest-target search ({s['modality']}): {s['index']}"
                     + (f", {s['lists probed']} of {s['lists']} lists probed" if s["lists probed"] else "")
                     + (f", recall@1 {recall:.4f} on {s['sampled queries']:,} sampled queries" if recall else ""))
    if stats["benchmark"]:
        b = stats["benchmark"]
        lines += [
            "",
            "## Benchmark",
            "",
            f"- {b['quadruplets']:,} quadruplets, {b['leakage']['findings']} leakage findings",
        ]
    return "\n".join(lines) + "\n"


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
    (out / "report.html").write_text(render_html(stats, plots, rows, show_unsafe), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(stats), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(stats, indent=2, default=str) + "\n")
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
