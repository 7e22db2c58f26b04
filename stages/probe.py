"""A linear safety probe: logistic regression on embeddings, fitted on the records that carry labels.

Zero-shot prompts are a good start but a few thousand labelled records usually do better. The probe is fitted
once, on the driver (score stage ``prepare``), per modality, over the classes ``safe`` + the taxonomy. It is
*cross-fitted*: records are split into folds by a hash of their key, and a labelled record is scored by the
probe that did not see it, so its probe score is an honest out-of-sample figure that thresholds can be set on.
Unlabelled records are scored by the probe fitted on all labelled ones.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

PROBE_FILE = "_probe.npz"


def fold_of(key: str, folds: int) -> int:
    return zlib.crc32(key.encode()) % folds


def probe_label(role: str | None, category: str | None, classes: list[str]) -> int | None:
    """Class index of a labelled record; None when it has no usable label."""
    if role == "safe":
        return 0
    if role == "unsafe" and category in classes:
        return classes.index(category)
    return None


def fit_probes(
    vectors: dict[str, np.ndarray],
    labels: np.ndarray | dict[str, np.ndarray],
    keys: list[str],
    classes: list[str],
    folds: int,
    c: float,
) -> tuple[dict[str, np.ndarray], dict]:
    """Weights per (modality, fold) plus an 'all' fold; labels -1 = unlabelled, one array for every modality or
    one per modality (a record without that modality's embedding must not train its probe on zeros).
    Returns (arrays, summary)."""
    from sklearn.linear_model import LogisticRegression

    per_modality = labels if isinstance(labels, dict) else dict.fromkeys(vectors, labels)
    fold = np.array([fold_of(k, folds) for k in keys])
    arrays: dict[str, np.ndarray] = {}
    counted = max(int((y >= 0).sum()) for y in per_modality.values())
    summary: dict = {"classes": classes, "folds": folds, "labelled": counted, "accuracy": {}}
    for modality, x in vectors.items():
        labels = per_modality[modality]
        labelled = labels >= 0
        present = sorted(set(labels[labelled].tolist()))
        if len(present) < 2:
            raise ValueError(
                f"the {modality} probe needs labelled records of at least two classes, found {len(present)}"
            )
        correct = total = 0
        for f in [*range(folds), "all"]:
            train = labelled & (fold != f) if f != "all" else labelled
            model = LogisticRegression(C=c, max_iter=2000)
            model.fit(x[train], labels[train])
            weights = np.zeros((len(classes), x.shape[1]), np.float32)
            bias = np.full(len(classes), -1e4, np.float32)  # a class never seen is never predicted
            if len(model.classes_) > 2:
                weights[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
            else:  # binary: sklearn keeps one vector for classes_[1]; softmax([0, z]) = sigmoid(z)
                weights[model.classes_[1]], bias[model.classes_[1]] = model.coef_[0], model.intercept_[0]
                bias[model.classes_[0]] = 0.0
            arrays[f"{modality}_{f}_w"], arrays[f"{modality}_{f}_b"] = weights, bias
            if f != "all":
                test = labelled & (fold == f)
                correct += int((model.predict(x[test]) == labels[test]).sum())
                total += int(test.sum())
        summary["accuracy"][modality] = correct / total if total else float("nan")
    return arrays, summary


def save_probes(folder: Path, arrays: dict[str, np.ndarray], summary: dict) -> None:
    from saferclip_data.pipeline.workdir import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PROBE_FILE, suffix=".npz") as tmp:
        np.savez(tmp, summary=np.array(json.dumps(summary)), **arrays)


class Probes:
    """The fitted probes as loaded by a worker."""

    def __init__(self, folder: Path):
        data = np.load(folder / PROBE_FILE)
        self.summary = json.loads(str(data["summary"]))
        self.arrays = {k: data[k] for k in data.files if k != "summary"}
        self.folds = self.summary["folds"]

    def probabilities(self, modality: str, x: np.ndarray, keys: list[str], labelled: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities: labelled rows by the probe of the folds that left them out."""
        which = [str(fold_of(k, self.folds)) if lab else "all" for k, lab in zip(keys, labelled)]
        out = np.zeros((len(keys), len(self.summary["classes"])), np.float32)
        for f in set(which):
            rows = [i for i, w in enumerate(which) if w == f]
            logits = x[rows] @ self.arrays[f"{modality}_{f}_w"].T + self.arrays[f"{modality}_{f}_b"]
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            out[rows] = p / p.sum(1, keepdims=True)
        return out
