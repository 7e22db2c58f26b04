"""The fine-tuning loop: streamed quadruplet shards, SaFeR-CLIP or the Safe-CLIP baseline, checkpoint and resume.

Resume is exact: a checkpoint holds the model, optimiser, scheduler, the epoch, how many batches of that epoch
were consumed, and the global step; the data stream of an epoch is a pure function of (seed, epoch), so a
resumed run skips the consumed batches and sees the same data in the same order as an uninterrupted one.
Checkpoints are written to a temp file and renamed, so a kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import DEFAULT_SCHEDULE, buckets_for_epoch, quad_pipeline
from .losses import SaferWeights
from .reference import TrainedWithReference


@dataclass
class TrainConfig:
    method: str = "saferclip"  # or "safeclip" (the baseline)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 50  # optimiser steps
    schedule: list[list[str]] = field(default_factory=lambda: [list(b) for b in DEFAULT_SCHEDULE])
    weights: dict[str, float] = field(default_factory=dict)


def samples_per_epoch(shard_dir: Path, epoch: int, schedule) -> int:
    """From the shards' stats.json: how many samples the curriculum admits in ``epoch``."""
    stats = json.loads((shard_dir / "stats.json").read_text())
    admitted = buckets_for_epoch(epoch, schedule)
    return sum(n for info in stats.values() for bucket, n in info["difficulty"].items() if bucket in admitted)


def _truncate_log(path: Path, last_step: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(clip, shard_dir: Path, out_dir: Path, config: TrainConfig, stop_after: int | None = None) -> dict:
    """Train ``clip.model`` in place on the quad shards in ``shard_dir``; resumes from ``out_dir/last.pt``.

    Writes ``out_dir/log.jsonl`` (one line per optimiser step: step, epoch, loss, terms, the batch's keys) and
    checkpoints. ``stop_after`` ends the run after that many optimiser steps (for tests and budgets).
    """
    from .losses import weights_from

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no training tars in {shard_dir}")
    pair = TrainedWithReference(clip.model)
    weights: SaferWeights = weights_from(config.weights)
    params = pair.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = [math.ceil(samples_per_epoch(shard_dir, e, config.schedule) / config.batch_size)
                 for e in range(config.epochs)]  # fmt: skip
    total_steps = max(1, sum(math.ceil(n / config.grad_accum) for n in per_epoch))

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_epoch, skip_batches, step = 0, 0, 0
    checkpoint = out_dir / "last.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        pair.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, skip_batches, step = state["epoch"], state["batches_done"], state["step"]
        torch.set_rng_state(state["rng"])
    _truncate_log(out_dir / "log.jsonl", step)  # steps after the checkpoint are done again
    log = (out_dir / "log.jsonl").open("a")

    def save(epoch: int, batches_done: int) -> None:
        _save(checkpoint, {"model": pair.model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                           "step": step, "rng": torch.get_rng_state(), "config": asdict(config)})  # fmt: skip

    for epoch in range(start_epoch, config.epochs):
        stream = quad_pipeline(urls, clip.preprocess, clip.tokenizer, clip.image_size, epoch=epoch,
                               batch_size=config.batch_size, seed=config.seed, schedule=config.schedule)  # fmt: skip
        done = 0
        keys: list[str] = []
        parts: dict[str, float] = {}
        for batch in stream:
            done += 1
            if epoch == start_epoch and done <= skip_batches:
                continue  # consumed before the checkpoint: same stream, same order
            loss, parts = pair.loss(batch, config.method, weights)
            (loss / config.grad_accum).backward()
            keys += batch["key"]
            if done % config.grad_accum and done != per_epoch[epoch]:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.write(json.dumps({"step": step, "epoch": epoch, "loss": float(loss.detach()), "terms": parts,
                                  "keys": keys}) + "\n")  # fmt: skip
            log.flush()
            keys = []
            if step % config.checkpoint_every == 0:
                save(epoch, done)
            if stop_after is not None and step >= stop_after:
                save(epoch, done)
                log.close()
                return {"step": step, "epoch": epoch, "stopped": True}
        save(epoch + 1, 0)
    log.close()
    return {"step": step, "epoch": config.epochs, "stopped": False}
