"""`saferclip-data bench classifiers`: the image classifiers on real photographs, and what they cost per image.

The packaged photographs (:mod:`real_photos`, all safe) are built through source -> embed -> score with the
classifier in the score stage, as a user's data would be: every file is either kept or rejected with a reason,
and the classifier's false-positive rate at its threshold is the share of kept photographs it calls unsafe.
Then the classifier's CPU time per image is set against the image tower of the embed stage's model on the same
photographs, same threads (random-init weights: the cost does not depend on them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def photo_recipe(manifest: Path, work: Path, arch: str) -> dict[str, Any]:
    return {
        "name": "real-photos",
        "workdir": str(work),
        "source": {"kind": "manifest", "path": str(manifest), "shard_size": 64, "extra_columns": ["role"]},
        "model": {"arch": arch, "pretrained": None, "init_seed": 0},
        "stages": {
            "embed": {"batch_size": 16, "concurrency": 1},
            "score": {"role_column": "role", "classifiers": [{"name": "opennsfw", "model": "opennsfw",
                                                              "category": "sexual"}]},  # fmt: skip
        },
    }


def false_positives(work: Path) -> dict[str, Any]:
    """Per photograph its OpenNSFW score; kept/rejected counts with reasons; the false-positive rate."""
    from saferclip_data.pipeline.workdir import WorkDir

    wd = WorkDir(work)
    scores = wd.read_stage_columns("score", ["key", "opennsfw_sexual"]).to_pylist()
    rejects = [r for stage in ("source", "embed", "score") for r in wd.rejects(stage).to_pylist()]
    threshold = 0.8
    flagged = [r["key"] for r in scores if r["opennsfw_sexual"] is not None and r["opennsfw_sexual"] >= threshold]
    return {
        "photos": len(scores) + len(rejects),
        "kept": len(scores),
        "rejected": [(r["key"], r["reason"]) for r in rejects],
        "scores": {r["key"]: r["opennsfw_sexual"] for r in scores},
        "threshold": threshold,
        "flagged": flagged,
        "false_positive_rate": len(flagged) / max(1, len(scores)),
    }


def cost_per_image(images: list[Path], arch: str, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` milliseconds per image: OpenNSFW (decode + preprocess + ONNX) and the model's image
    tower (decode + preprocess + encode), in this process on the same threads."""
    import torch
    from PIL import Image

    from saferclip_data.models.clip import load_clip
    from saferclip_data.models.decode import to_rgb
    from saferclip_data.stages.classifiers import ClassifierConfig, ImageClassifier

    blobs = [p.read_bytes() for p in images]
    threads = torch.get_num_threads()
    classifier = ImageClassifier(ClassifierConfig(name="opennsfw"), threads)

    def classify() -> None:
        classifier.scores(blobs)

    clip = load_clip(arch, None, init_seed=0)
    model = clip.model.eval()

    def embed() -> None:
        import io

        with torch.inference_mode():
            for start in range(0, len(blobs), 16):
                batch = [clip.preprocess(to_rgb(Image.open(io.BytesIO(b)))) for b in blobs[start : start + 16]]
                model.encode_image(torch.stack(batch))

    out = {"threads": float(threads)}
    for name, fn in (("classifier_ms", classify), ("embed_ms", embed)):
        fn()  # warm-up
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = 1000 * best / len(blobs)
    out["ratio"] = out["classifier_ms"] / out["embed_ms"]
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def photo_paths(manifest: Path) -> list[Path]:
    import csv

    with manifest.open() as f:
        return [Path(row["image"]) for row in csv.DictReader(f)]


def score_summary(values: dict[str, float | None]) -> str:
    kept = np.array([v for v in values.values() if v is not None], np.float64)
    if not len(kept):
        return "no scores"
    return f"median {np.median(kept):.3f}, 90th percentile {np.percentile(kept, 90):.3f}, max {kept.max():.3f}"


def run_and_report(model: str, folder: Path, repeats: int, console: Any) -> None:
    """Build the photographs through source -> embed -> score in a child process, then print OpenNSFW's scores,
    what was kept or rejected, the false-positive rate and its CPU cost against ``model``'s image tower."""
    import subprocess
    import sys

    import yaml
    from rich.console import Console
    from rich.table import Table

    from saferclip_data.bench.real_photos import write_photo_manifest

    folder.mkdir(parents=True, exist_ok=True)
    manifest = write_photo_manifest(folder)
    recipe = folder / "photos.yaml"
    recipe.write_text(yaml.safe_dump(photo_recipe(manifest, folder / "work", "toy-vit-tiny")))
    command = [sys.executable, "-m", "saferclip_data.cli.main", "build", str(recipe), "--executor", "local",
               "--no-progress"]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"the photo build failed: {built.stderr.strip().splitlines()[-1:]}")
    found = false_positives(folder / "work")
    table = Table(title=f"OpenNSFW on {found['photos']} real photographs (all safe)")
    for column in ("photograph", "OpenNSFW score", f"≥ {found['threshold']}"):
        table.add_column(column, justify="left" if column == "photograph" else "right")
    for key, value in sorted(found["scores"].items(), key=lambda kv: -(kv[1] or 0)):
        table.add_row(key, "-" if value is None else f"{value:.3f}", "unsafe" if key in found["flagged"] else "")
    Console(width=max(Console().width, 100)).print(table)
    console.print(f"kept {found['kept']} of {found['photos']}; rejected: "
                  f"{', '.join(f'{k} ({r})' for k, r in found['rejected']) or 'none'}")  # fmt: skip
    console.print(f"OpenNSFW scores: {score_summary(found['scores'])}")
    console.print(f"false-positive rate at {found['threshold']}: {found['false_positive_rate']:.1%} "
                  f"({len(found['flagged'])} of {found['kept']})")  # fmt: skip
    cost = cost_per_image(photo_paths(manifest), model, repeats)
    console.print(f"CPU cost per image ({cost['threads']:.0f} threads): OpenNSFW {cost['classifier_ms']:.1f} ms, "
                  f"{model} image tower {cost['embed_ms']:.1f} ms (decode and preprocessing included in both): "
                  f"the classifier adds {cost['ratio']:.2f}x the embedding's cost")  # fmt: skip
    console.print(f"work dir: {folder / 'work'}")
