"""Training metrics in the trackers users already read: TensorBoard event files and Weights & Biases.

The trainer hands each logged step's numbers (loss, its terms, learning rate) to :class:`Trackers`, which writes
them to every tracker the config asks for; ``eval`` hands its figures the same way. Only rank 0 tracks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saferclip_data.pipeline.errors import UserError, missing_extra


class Trackers:
    """TensorBoard (``log_dir``) and/or wandb (``project``); a no-op when given neither."""

    def __init__(self, log_dir: str | Path | None, project: str | None, run_dir: Path, config: Mapping[str, Any]):
        self.board = self.wandb_run = None
        if log_dir is not None:
            problem = missing_extra("tensorboard", "track")
            if problem:
                raise UserError(f"training.log_dir: {problem}")
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(log_dir))
        if project is not None:
            problem = missing_extra("wandb", "track")
            if problem:
                raise UserError(f"training.wandb: {problem}")
            import wandb

            # offline unless the user chose otherwise (WANDB_MODE, or a key to reach the server with)
            online = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=project, dir=str(run_dir), config=dict(config), mode=online,
                                        resume="allow", reinit="finish_previous")  # fmt: skip

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(name, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)

    def flush(self) -> None:
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def step_scalars(entry: Mapping[str, Any], loss: float, terms: Mapping[str, float]) -> dict[str, float]:
    """One logged step as tracker scalars: ``loss``, ``loss/<term>`` and ``lr``."""
    values = {"loss": loss, **{f"loss/{name}": value for name, value in terms.items()}}
    if entry.get("lr") is not None:
        values["lr"] = float(entry["lr"])
    return values


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a nested dict of figures, keyed by its slash-joined path (``eval/base/T->V/R@1``)."""
    if isinstance(tree, Mapping):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(tree, bool) or not isinstance(tree, int | float):
        return {}
    return {prefix: float(tree)}


def log_figures(results: Mapping[str, Any], log_dir: str | Path | None, project: str | None, run_dir: Path) -> None:
    """``eval``'s figures (per model: retrieval recalls, zero-shot accuracy, drift) as tracker scalars."""
    if log_dir is None and project is None:
        return
    trackers = Trackers(log_dir, project, run_dir, {"kind": "eval"})
    trackers.scalars(0, numeric_leaves({"eval": results}))
    trackers.close()
