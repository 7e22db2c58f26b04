"""The comparison users want to see: base vs SaFeR-CLIP vs Safe-CLIP, LoRA and full, over seeds.

Each run's figures are those of ``evaluate`` (one JSON per run); this module reduces them to one row per method
and fine-tuning mode (mean ± standard deviation over seeds), writes the table as Markdown and JSON, and draws the
trade-off: zero-shot retention against unsafe→safe R@1, one point per run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saferclip_data.pipeline.workdir import atomic_path, atomic_write_text

#: column -> where it sits in an ``evaluate`` result (path of keys); missing parts are skipped
COLUMNS: dict[str, tuple[str, ...]] = {
    "benchmark T*->V R@1": ("retrieval", "T*->V safe+unsafe", "R@1"),
    "benchmark V*->T R@1": ("retrieval", "V*->T safe+unsafe", "R@1"),
    "benchmark T->V R@1 (safe gallery)": ("retrieval", "T->V safe", "R@1"),
    "held-out T*->V R@1": ("heldout_retrieval", "T*->V safe+unsafe", "R@1"),
    "held-out T->V R@1 (safe gallery)": ("heldout_retrieval", "T->V safe", "R@1"),
    "zero-shot avg": ("summary", "zero-shot avg"),
    "toy object acc": ("zero_shot", "toy object"),
    "toy place acc": ("zero_shot", "toy place"),
    "image drift": ("safe_embedding_drift", "image"),
}
METHOD_NAMES = {"saferclip": "SaFeR-CLIP", "safeclip": "Safe-CLIP"}


def run_name(method: str, finetune: str, seed: int) -> str:
    return f"{method}-{finetune}-seed{seed}"


def _value(result: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return float(result)


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": len(values)}  # fmt: skip


def aggregate(base: dict, runs: dict[tuple[str, str, int], dict]) -> dict[str, dict]:
    """Row name -> column -> {mean, sd, runs}; the base model first, then each (method, fine-tuning) pair."""
    base_row = {c: _mean_sd([v]) for c, p in COLUMNS.items() if (v := _value(base, p)) is not None}
    rows: dict[str, dict] = {"base": base_row}
    groups: dict[tuple[str, str], list[dict]] = {}
    for (method, finetune, _), result in runs.items():  # in the order the runs were asked for
        groups.setdefault((method, finetune), []).append(result)
    for (method, finetune), results in groups.items():
        row = {}
        for column, path in COLUMNS.items():
            values = [v for r in results if (v := _value(r, path)) is not None]
            if values:
                row[column] = _mean_sd(values)
        rows[f"{METHOD_NAMES.get(method, method)}, {finetune}"] = row
    return rows


def markdown(rows: dict[str, dict], seeds: int, budget: str) -> str:
    columns = [c for c in COLUMNS if any(c in r for r in rows.values())]
    lines = [f"Mean ± standard deviation over {seeds} seed(s); {budget}. R@1 on the safe+unsafe gallery unless "
             "marked; the hit is always the safe item.", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]  # fmt: skip
    for name, row in rows.items():
        cells = []
        for c in columns:
            if c not in row:
                cells.append("–")
            elif row[c]["runs"] > 1:
                cells.append(f"{row[c]['mean']:.3f} ± {row[c]['sd']:.3f}")
            else:
                cells.append(f"{row[c]['mean']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_points(base: dict, runs: dict[tuple[str, str, int], dict]) -> list[dict]:
    """One point per run: zero-shot accuracy kept (share of the base model's) and benchmark T*->V R@1."""
    base_zero_shot = _value(base, COLUMNS["zero-shot avg"])
    points = []
    for (method, finetune, seed), result in sorted(runs.items()):
        zero_shot = _value(result, COLUMNS["zero-shot avg"])
        retention = zero_shot / base_zero_shot if zero_shot is not None and base_zero_shot else math.nan
        points.append({"method": method, "finetune": finetune, "seed": seed, "zero_shot_retention": retention,
                       "unsafe_to_safe_r1": _value(result, COLUMNS["benchmark T*->V R@1"])})  # fmt: skip
    return points


def plot_tradeoff(base: dict, points: list[dict], path: Path) -> None:
    """Zero-shot retention (x) against unsafe→safe R@1 (y): up and right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    colours = {"saferclip": "tab:green", "safeclip": "tab:orange"}
    markers = {"lora": "o", "full": "s"}
    for method in sorted({p["method"] for p in points}):
        for finetune in sorted({p["finetune"] for p in points}):
            chosen = [p for p in points if p["method"] == method and p["finetune"] == finetune]
            if chosen:
                ax.scatter([p["zero_shot_retention"] for p in chosen], [p["unsafe_to_safe_r1"] for p in chosen],
                           c=colours.get(method, "tab:blue"), marker=markers.get(finetune, "^"), s=50,
                           label=f"{METHOD_NAMES.get(method, method)}, {finetune}")  # fmt: skip
    ax.scatter([1.0], [_value(base, COLUMNS["benchmark T*->V R@1"])], c="black", marker="*", s=120, label="base")
    ax.set_xlabel("zero-shot accuracy kept (share of the base model's)")
    ax.set_ylabel("benchmark unsafe→safe R@1 (T*→V, safe+unsafe gallery)")
    ax.set_title("Safety against knowledge, one point per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_comparison(out: Path, base: dict, runs: dict[tuple[str, str, int], dict], seeds: int, budget: str) -> Path:
    """results.md, results.json and tradeoff.png in ``out``; returns the Markdown file."""
    rows = aggregate(base, runs)
    points = tradeoff_points(base, runs)
    payload = {"rows": rows, "points": points, "seeds": seeds, "budget": budget}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown(rows, seeds, budget))
    plot_tradeoff(base, points, out / "tradeoff.png")
    return out / "results.md"


def run_comparison(pipeline: Any, methods: list[str], modes: list[str], seeds: int, epochs: int | None, out: Path,
                   progress: bool, echo: Callable[[str], None]) -> Path:  # fmt: skip
    """Train and evaluate every method x mode x seed of a finished build (runs done before are read back, an
    interrupted one resumes), then write the comparison; returns results.md."""
    from saferclip_data.pipeline.progress import step_progress
    from saferclip_data.training.recipe_inputs import evaluation_inputs, finished_shards, training_config
    from saferclip_data.training.trainer import load_checkpoint, train

    shard_dir = finished_shards(pipeline)
    configs = {(m, f, s): training_config(pipeline, {"method": m, "finetune": f, "seed": s, "epochs": epochs})
               for m in methods for f in modes for s in range(seeds)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    inputs = evaluation_inputs(pipeline)
    base_file = out / "base.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base = inputs.figures(inputs.fresh())
        atomic_write_text(base_file, json.dumps(base, indent=2) + "\n")
    results = {}
    for i, (key, config) in enumerate(configs.items(), 1):
        name = run_name(*key)
        run_dir = out / "runs" / name
        figures_file = run_dir / "eval.json"
        if figures_file.is_file():
            echo(f"[{i}/{len(configs)}] {name}: done before ({figures_file})")
            results[key] = json.loads(figures_file.read_text())
            continue
        resumed = " (resuming)" if (run_dir / "last.pt").is_file() else ""
        echo(f"[{i}/{len(configs)}] {name}: training{resumed}")
        with step_progress(name, enabled=progress) as on_step:
            train(inputs.fresh(), shard_dir, run_dir, config, on_step=on_step)
        results[key] = inputs.figures(load_checkpoint(inputs.fresh(), run_dir / "last.pt"))
        atomic_write_text(figures_file, json.dumps(results[key], indent=2) + "\n")
    first = next(iter(configs.values()))
    budget = f"{first.epochs} epochs, batch {first.batch_size}, lr {first.lr:g}, the recipe's loss weights"
    return write_comparison(out, base, results, seeds, budget)
