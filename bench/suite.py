"""`saferclip-data bench suite`: every GPU throughput benchmark in one run, against its targets.

Made for a GPU session that may be short: one command measures kNN, the embed stage (ViT-L/14 and ViT-B/32,
in-process and through Ray, one and two actors per GPU) and the trainer (LoRA and full), writes
``results.json`` and ``results.md`` into ``--out`` after every part (a run cut short keeps what it measured),
and marks each figure against its target (``TARGETS``). A part that fails records its error and the suite
goes on. ``--quick`` runs the same parts on toy shapes, so the suite itself is tested on a CPU.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: the parts of the full (GPU) suite, most important first (a run cut short keeps the first ones), and of the
#: quick (CPU) one, which runs the same code on toy shapes
EMBED_RUN = {"batch_size": 512, "cpus": 4.0, "image_px": 256}
FULL: list[dict[str, Any]] = [
    {"kind": "knn", "pool_rows": 4_000_000, "query_rows": 100_000, "dim": 768, "k": 16, "repeats": 2},
    {"kind": "embed", "arch": "ViT-L-14", "images": 20_480, "concurrency": 1, "gpus": "auto", **EMBED_RUN},
    {"kind": "embed", "arch": "ViT-B-32", "images": 32_768, "concurrency": 1, "gpus": "auto", **EMBED_RUN},
    # two actors feeding one GPU: ViT-B/32's encoder (~15 ms a batch) may be faster than one worker's host work
    {
        "kind": "embed",
        "arch": "ViT-B-32",
        "images": 32_768,
        "concurrency": 2,
        "gpus": 0.5,
        "executors": ["ray"],
        **EMBED_RUN,
    },
    {"kind": "train", "arch": "ViT-B-32", "finetune": "lora", "batch_size": 256, "steps": 5},
    {"kind": "train", "arch": "ViT-L-14", "finetune": "lora", "batch_size": 48, "steps": 5},
    {"kind": "train", "arch": "ViT-L-14", "finetune": "full", "batch_size": 48, "steps": 5},
    {"kind": "train", "arch": "ViT-L-14", "finetune": "full", "batch_size": 128, "steps": 5},
    # training.compile (fused layer norms, activations and casts; about two minutes to compile): a candidate for
    # the MFU target like the eager rows, being a setting users have
    {"kind": "train", "arch": "ViT-L-14", "finetune": "full", "batch_size": 128, "steps": 5, "compile": "default"},
    {"kind": "loader", "arch": "ViT-L-14", "batch_size": 48, "samples": 4096},
    # ViT-B/32 LoRA steps fastest of all: the batch the loader most has to keep up with
    {"kind": "loader", "arch": "ViT-B-32", "batch_size": 256, "samples": 16_384},
    # whether torch.compile pays (compiling costs about a minute per process: near the end)
    {
        "kind": "embed",
        "arch": "ViT-B-32",
        "images": 32_768,
        "concurrency": 1,
        "gpus": "auto",
        "executors": ["local"],
        "compile": "default",
        **EMBED_RUN,
    },
    # the frozen reference as the trained model (fp32 under autocast), to show what bf16 reference weights bring
    {"kind": "train", "arch": "ViT-L-14", "finetune": "full", "batch_size": 48, "steps": 5, "reference": "fp32"},
]
QUICK: list[dict[str, Any]] = [
    {"kind": "knn", "pool_rows": 6_400, "query_rows": 300, "dim": 32, "k": 16, "repeats": 1},
    {
        "kind": "embed",
        "arch": "toy-vit-tiny",
        "images": 96,
        "concurrency": 1,
        "gpus": 0,
        "executors": ["local"],
        "batch_size": 32,
        "cpus": 1.0,
        "image_px": 64,
    },  # fmt: skip
    {"kind": "train", "arch": "toy-vit-tiny", "finetune": "lora", "batch_size": 8, "steps": 1},
    {"kind": "train", "arch": "toy-vit-tiny", "finetune": "lora", "batch_size": 8, "steps": 1, "reference": "bf16"},
    {"kind": "loader", "arch": "toy-vit-tiny", "batch_size": 8, "samples": 64},
]

#: the throughput targets a GPU build should meet: figure name -> (comparison, threshold)
TARGETS: dict[str, tuple[str, float]] = {
    "embed ViT-L-14 local / encoder": (">=", 0.9),
    "embed ViT-B-32 local img/s": (">=", 14_000),
    "embed ViT-B-32 x2 actors ray img/s": (">=", 14_000),  # the same target, met by two actors on the GPU
    "embed ViT-L-14 ray / local": (">=", 0.9),
    "embed ViT-B-32 ray / local": (">=", 0.9),
    "knn effective TFLOP/s": (">=", 300),
    "knn x naive": (">=", 2.0),
    "knn exact rows": (">=", 0.99),
    "train ViT-L-14 full MFU": (">=", 0.35),
}


@dataclass
class SuiteResults:
    out: Path
    machine: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def verdicts(self) -> dict[str, dict]:
        """Each target with its figure and whether it passes; judged only on a GPU (the targets are an H200's)."""
        out = {}
        on_gpu = bool(self.machine.get("cuda"))
        for name, (op, threshold) in TARGETS.items():
            value = self.figures.get(name)
            judged = value is not None and on_gpu
            passed = None if not judged else (value >= threshold if op == ">=" else value <= threshold)
            out[name] = {"value": value, "target": f"{op} {threshold:g}", "pass": passed}
        return out

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {**asdict(self), "out": str(self.out), "verdicts": self.verdicts()}
        (self.out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
        (self.out / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"# bench suite on {self.machine.get('device', '?')}", "", "| figure | value | target | pass |",
                 "|---|---|---|---|"]  # fmt: skip
        for name, v in self.verdicts().items():
            value = "not measured" if v["value"] is None else f"{v['value']:,.3f}"
            lines.append(f"| {name} | {value} | {v['target']} | {'-' if v['pass'] is None else v['pass']} |")
        lines += ["", "| other figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:,.3f} |" for k, v in self.figures.items() if k not in TARGETS]
        for part, rows in self.tables.items():
            lines += ["", f"## {part}", "", "```", *(json.dumps(r, default=str) for r in rows), "```"]
        for part, error in self.errors.items():
            lines += ["", f"## {part}: FAILED", "", "```", error, "```"]
        return "\n".join(lines) + "\n"


def machine_facts() -> dict[str, Any]:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpus": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        facts["cuda"] = torch.version.cuda
    else:
        facts["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return facts


def _part(results: SuiteResults, name: str, run: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run one part; its error is recorded, not raised; the results are written either way."""
    import torch

    log(f"{name} ...")
    started = time.perf_counter()
    try:
        run()
    except Exception:  # one broken part must not cost the figures of the others
        results.errors[name] = traceback.format_exc(limit=8)
        log(f"{name} FAILED: {results.errors[name].strip().splitlines()[-1]}")
    results.seconds[name] = round(time.perf_counter() - started, 1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    results.write()


def _knn(results: SuiteResults, spec: dict) -> None:
    from saferclip_data.bench.knn import run_knn_bench

    rows = run_knn_bench(spec["pool_rows"], spec["query_rows"], spec["dim"], spec["k"], ["torch"], spec["repeats"])
    results.tables["knn"] = [asdict(r) for r in rows]
    naive, ours = rows[0], rows[1]
    results.figures.update(
        {
            "knn effective TFLOP/s": ours.tflops,
            "knn x naive": naive.seconds / ours.seconds,
            "knn exact rows": ours.exact_rows,
            "knn recall": ours.recall,
            "knn naive TFLOP/s": naive.tflops,
            "knn time / matmul": ours.seconds / ours.matmul_seconds,
        }
    )


def _embed(results: SuiteResults, spec: dict, name: str, scratch: Path) -> None:
    from saferclip_data.bench.embed import EmbedRun, run_bench

    run = EmbedRun(spec["batch_size"], spec["concurrency"], spec["cpus"], spec["gpus"], compile=spec.get("compile"))
    executors = spec.get("executors", ["local", "ray"])
    rows = run_bench(spec["arch"], spec["images"], spec["image_px"], executors, run, scratch=scratch)
    results.tables[name] = [dict(zip(("path", "where", "img/s", "seconds", "ratio", "ray/local"), r)) for r in rows]
    encoder = float(rows[0][2].replace(",", ""))
    results.figures[f"{name} encoder img/s"] = encoder
    for row in rows[1:]:
        if row[0].startswith("  per batch: "):
            results.figures[f"{name} {row[0].strip()} /s"] = float(row[2].replace(",", ""))
            continue
        executor = row[0].rsplit(" ", 1)[-1]
        rate = float(row[2].replace(",", ""))
        results.figures[f"{name} {executor} img/s"] = rate
        results.figures[f"{name} {executor} / encoder"] = rate / encoder
        if row[5]:
            results.figures[f"{name} {executor} / local"] = float(row[5])


def _train(results: SuiteResults, spec: dict, name: str) -> None:
    from saferclip_data.bench.train import bench_train

    reference = spec.get("reference", "auto")
    r = bench_train(spec["arch"], spec["finetune"], spec["batch_size"], spec["steps"], "auto", "auto", None, reference,
                    spec.get("compile"))  # fmt: skip
    results.tables[name] = [r]
    results.figures[f"{name} samples/s"] = r["samples_per_s"]
    if r["mfu"] is None:
        return  # no peak known for this device
    results.figures[f"{name} MFU"] = r["mfu"]
    if reference == "auto":  # a row with another reference is a comparison, not a candidate for the target
        best = f"train {spec['arch']} {spec['finetune']} MFU"  # the target's figure: the best batch size
        results.figures[best] = max(results.figures.get(best, 0.0), r["mfu"])


def _loader(results: SuiteResults, spec: dict, name: str) -> None:
    import torch

    from saferclip_data.bench.train import loader_rate
    from saferclip_data.training.device import loader_workers

    workers = loader_workers("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rate, where, stream = loader_rate(spec["arch"], spec["batch_size"], workers, samples=spec["samples"])
    results.tables[name] = [{"samples_per_s": rate, "workers": workers, "decoded": where, "stream_per_worker": stream}]
    results.figures[f"{name} samples/s"] = rate
    results.figures[f"{name} stream read by one worker of 8 /s"] = stream
    # against each trainer row of the same model: >= 1 means loading keeps up with the step
    for row in [k for k in results.figures if k.startswith(f"train {spec['arch']} ") and k.endswith(" samples/s")]:
        results.figures[row.replace(" samples/s", " loader / step")] = rate / results.figures[row]


def part_name(spec: dict) -> str:
    if spec["kind"] == "embed":
        actors = f" x{spec['concurrency']} actors" if spec["concurrency"] > 1 else ""
        return f"embed {spec['arch']}{actors}" + (f" compiled {spec['compile']}" if spec.get("compile") else "")
    if spec["kind"] == "train":
        reference = f", reference {spec['reference']}" if "reference" in spec else ""
        compiled = f" compiled {spec['compile']}" if spec.get("compile") else ""
        return f"train {spec['arch']} {spec['finetune']} batch {spec['batch_size']}{reference}{compiled}"
    if spec["kind"] == "loader":
        return f"loader {spec['arch']} batch {spec['batch_size']}"
    return spec["kind"]


def selected_parts(patterns: list[str] | None, quick: bool = False) -> list[dict[str, Any]]:
    """The suite's parts named by ``patterns`` (all when None), in the suite's order: a pattern that is a part's
    whole name selects that part, any other the parts whose names contain it."""
    specs = QUICK if quick else FULL
    if not patterns:
        return specs
    names = [part_name(s) for s in specs]

    def selects(pattern: str, name: str) -> bool:
        return pattern == name if pattern in names else pattern in name

    chosen = [s for s, name in zip(specs, names) if any(selects(p, name) for p in patterns)]
    unmatched = [p for p in patterns if not any(selects(p, name) for name in names)]
    if unmatched:
        raise ValueError(f"--part {unmatched[0]!r} matches no part of the suite (parts: {'; '.join(names)})")
    return chosen


def _previous(out: Path, machine: dict[str, Any]) -> SuiteResults:
    """The results already in ``out`` from the same kind of machine, to be added to (a GPU session may run the
    suite in several calls); a fresh set where there are none or they come from another device."""
    results = SuiteResults(out, machine)
    saved = out / "results.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("machine", {}).get("device") == machine.get("device"):
            for name in ("figures", "tables", "errors", "seconds"):
                getattr(results, name).update(old.get(name, {}))
    return results


def run_suite(out: Path, quick: bool = False, log: Callable[[str], None] = print,
              parts: list[str] | None = None) -> SuiteResults:  # fmt: skip
    """Run the parts of the full (or quick) suite in order (``parts``: only those, see :func:`selected_parts`;
    their results are added to those already in ``out``); results written after each. The embed parts share one
    scratch folder (synthetic shards and source stages made once per size)."""
    specs = selected_parts(parts, quick)
    results = _previous(out, machine_facts()) if parts else SuiteResults(out, machine_facts())
    results.write()
    with tempfile.TemporaryDirectory(prefix="saferclip-suite-") as tmp:
        scratch = Path(tmp)
        for spec in specs:
            name = part_name(spec)
            results.errors.pop(name, None)  # run again: its old failure no longer stands
            run = {
                "knn": lambda spec=spec: _knn(results, spec),
                "embed": lambda spec=spec, name=name: _embed(results, spec, name, scratch),
                "train": lambda spec=spec, name=name: _train(results, spec, name),
                "loader": lambda spec=spec, name=name: _loader(results, spec, name),
            }[spec["kind"]]
            _part(results, name, run, log)
    return results


def default_out() -> Path:
    return Path(tempfile.gettempdir()) / "saferclip-bench-suite"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
