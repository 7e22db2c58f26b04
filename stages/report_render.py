"""The audit report's two renderings of the collected stats: a self-contained HTML page and a Markdown summary."""

from __future__ import annotations

import html
import math
from typing import Any

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
    """The self-contained page: stages, composition, rejects, labels, classifiers, mining, plots, the benchmark
    datasheet and sample pairs."""
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
    parts += _mining(stats, plots) + _datasheet(stats["benchmark"]) + _samples(samples, show_unsafe)
    parts[-1] += "</main></body></html>"
    return "\n".join(parts)


def _mining(stats: dict, plots: list[tuple[str, str]]) -> list[str]:
    mining = [{"modality": k, **{x: y for x, y in v.items() if not isinstance(y, list)}}
              for k, v in stats["mining"].items()]  # fmt: skip
    parts = ["</section><section><h2>Mining</h2>", _table(mining),
             "<h3>Nearest-target search</h3><p class='note'>Recall@1 against the exact search, measured by the build "
             "on sampled queries; an approximate search probes lists until it reaches the recipe's min_recall.</p>",
             _table(stats["target_search"]), "</section><section><h2>Plots</h2>"]  # fmt: skip
    for title, png in plots:
        alt = html.escape(title)
        parts.append(f"<figure><img class='plot' alt='{alt}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{alt}</figcaption></figure>")  # fmt: skip
    return parts


def _datasheet(bench: dict | None) -> list[str]:
    parts = ["</section><section><h2>Benchmark datasheet</h2>"]
    if not bench:
        return parts + ["<p class='empty'>no benchmark stage in this work dir</p>"]
    return parts + [
        f"<p>{bench['quadruplets']:,} quadruplets; recipe fingerprint "
        f"<code>{html.escape(str(bench['recipe_fingerprint']))}</code></p><h3>Thresholds</h3>",
        _table([{"threshold": _heading(k), "value": v} for k, v in bench["thresholds"].items()]),
        "<h3>Per category</h3>",
        _table([{"category": k, **v} for k, v in bench["per_category"].items()]),
        "<h3>Pair similarity</h3>",
        _table([{"similarity": _heading(k), **v} for k, v in bench["similarity"].items() if v]),
        f"<h3>Leakage findings: {bench['leakage']['findings']:,}</h3>",
        _table(bench["leak_rows"]),
    ]


def _samples(samples: list[dict], show_unsafe: bool) -> list[str]:
    note = "shown unblurred (--show-unsafe)" if show_unsafe else "blurred; --show-unsafe shows them"
    parts = [f"</section><section><h2>Sample pairs</h2><p class='note'>Every category, over the difficulty buckets, "
             f"pairs of typical similarity in each. Unsafe images are {note}.</p><table><thead><tr><th>category</th>"
             "<th>difficulty</th><th>unsafe</th><th>caption</th><th>mined safe target</th><th>caption</th>"
             "<th>similarity</th></tr></thead><tbody>"]  # fmt: skip
    for s in samples:
        cells = []
        for image, cls in ((s["unsafe_thumb"], "unsafe-thumb"), (s["target_thumb"], "safe-thumb")):
            cells.append(f"<img class='{cls}' alt='{cls}' src='data:image/png;base64,{image}'>" if image else "")
        parts.append(
            f"<tr><td>{html.escape(str(s['category']))}</td><td>{html.escape(str(s['difficulty']))}</td>"
            f"<td>{cells[0]}</td><td>{html.escape(s['unsafe_caption'] or '')}</td><td>{cells[1]}</td>"
            f"<td>{html.escape(s['target_caption'] or '')}</td><td class='num'>{_fmt(s['similarity'])}</td></tr>"
        )
    parts.append("</tbody></table></section>")
    return parts


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
