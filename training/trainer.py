"""The fine-tuning loop: streamed quadruplet shards, SaFeR-CLIP or the Safe-CLIP baseline, checkpoint and resume.

Resume is exact: a checkpoint holds what trains (LoRA adapters or all weights), the optimiser, the scheduler,
the epoch, how many batches of that epoch were consumed, and the global step; the data stream of an epoch is a
pure function of (seed, epoch), so a resumed run skips the consumed batches and sees the same data in the same
order as an uninterrupted one. Checkpoints are written to a temp file and renamed, so a kill at any moment leaves
the previous one intact.

One process trains on one device (CUDA when there is one, bf16 autocast there). Under ``torchrun`` (or any
launcher that sets WORLD_SIZE/RANK and MASTER_ADDR) each process takes every WORLD_SIZE-th sample of the same
shuffled stream (or, with ``split: tars``, reads only its own tars), the encoders run inside
DistributedDataParallel, and rank 0 writes the log and checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from saferclip_data.models.clip import CompileMode, text_trim
from saferclip_data.pipeline.workdir import atomic_path
from saferclip_data.training.adapters import attach, load_trainable, merged, trainable_state
from saferclip_data.training.config import TrainConfig
from saferclip_data.training.data import SPLITS, buckets_for_epoch, epoch_shard_order, quad_pipeline
from saferclip_data.training.device import (
    autocast_for,
    batch_to_device,
    device_decoder,
    device_for,
    loader_workers,
    process_group,
    reference_dtype,
)
from saferclip_data.training.losses import SaferWeights
from saferclip_data.training.reference import TrainedWithReference
from saferclip_data.training.tracking import Trackers, step_scalars


def samples_per_epoch(shard_dir: Path, epoch: int, schedule) -> int:
    """From the shards' stats.json: how many samples the curriculum admits in ``epoch``."""
    stats = json.loads((shard_dir / "stats.json").read_text())
    admitted = buckets_for_epoch(epoch, schedule)
    return sum(n for info in stats.values() for bucket, n in info["difficulty"].items() if bucket in admitted)


def resolve_split(split: str, tars: int, world: int) -> str:
    """``auto``: each rank reads only its own tars wherever there are more tars than ranks (reading then scales
    with the ranks), else every rank reads the whole stream; one process reads the same either way."""
    if split != "auto":
        return split
    return "tars" if world > 1 and tars > world else "samples"


def samples_per_rank(shard_dir: Path, urls: list[str], epoch: int, config: TrainConfig, world: int) -> int:
    """How many samples each of ``world`` ranks trains on in ``epoch``: an equal share of the epoch's, or with
    ``split: tars`` the admitted samples of the rank with the fewest among its own tars (from stats.json)."""
    if config.split != "tars":
        return samples_per_epoch(shard_dir, epoch, config.schedule) // world
    if len(urls) < world:
        raise ValueError(f"split: tars needs at least one tar per process ({len(urls)} tars for {world} processes)")
    stats = json.loads((shard_dir / "stats.json").read_text())
    admitted = buckets_for_epoch(epoch, config.schedule)

    def admitted_in(url: str) -> int:
        if Path(url).name not in stats:
            raise ValueError(f"{shard_dir / 'stats.json'} has no counts for {Path(url).name}: rerun the shards stage")
        return sum(n for bucket, n in stats[Path(url).name]["difficulty"].items() if bucket in admitted)

    return min(sum(admitted_in(u) for u in epoch_shard_order(urls, config.seed, epoch, r, world, "tars"))
               for r in range(world))  # fmt: skip


def _truncate_log(path: Path, last_step: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class StepLog:
    """log.jsonl, written every ``every`` steps: entries keep their loss values as device tensors until then,
    so the training step never waits for the GPU to report a number. ``flush`` before a checkpoint keeps the
    log and the checkpoint in step (resume truncates the log to the checkpoint's step)."""

    def __init__(self, path: Path | None, every: int, trackers: Trackers | None = None):
        self.file = path.open("a") if path is not None else None
        self.every, self.pending, self.last_loss = every, [], None
        self.trackers = trackers  # TensorBoard / wandb: the same numbers, when the config asks

    def add(self, entry: dict, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if self.file is not None:
            self.pending.append((entry, loss.detach(), terms))
            if len(self.pending) >= self.every:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        scalars = [v.float().reshape(()) for _, loss, terms in self.pending for v in (loss, *terms.values())]
        numbers = iter(torch.stack(scalars).tolist())  # one transfer for all pending steps
        for entry, _, terms in self.pending:
            self.last_loss = next(numbers)
            values = {name: next(numbers) for name in terms}
            self.file.write(json.dumps({**entry, "loss": self.last_loss, "terms": values}) + "\n")
            if self.trackers is not None:
                self.trackers.scalars(entry["step"], step_scalars(entry, self.last_loss, values))
        self.file.flush()
        if self.trackers is not None:
            self.trackers.flush()
        self.pending = []

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()


def _checked(config: TrainConfig) -> None:
    if config.compile is not None and config.compile not in get_args(CompileMode):
        raise ValueError(f"compile: '{config.compile}' is not one of {', '.join(get_args(CompileMode))}")
    if config.split not in (*SPLITS, "auto"):
        raise ValueError(f"split: '{config.split}' is not one of {', '.join(SPLITS)}, auto")


def _trained_pair(clip, config: TrainConfig, device: torch.device, world: int) -> TrainedWithReference:
    """The model to train (adapters attached, or all weights) beside its frozen reference; compiled and wrapped in
    DistributedDataParallel as the configuration and the process group say."""
    pair = TrainedWithReference(
        clip.model.to(device), config.adapter(), reference_dtype(device, config.precision, config.reference_precision)
    )
    if config.compile is not None:
        pair.compile(config.compile)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        pair.encoder = torch.nn.parallel.DistributedDataParallel(
            pair.encoder,
            device_ids=ids,
            find_unused_parameters=True,  # text-only batches leave the image tower out
        )
    return pair


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _resume(checkpoint: Path, clip, pair, optimizer, scheduler, config: TrainConfig, device: torch.device):
    """Load ``checkpoint`` into the trained weights, optimiser, scheduler and RNG; returns (epoch, batches done in
    it, step, config with the run's data-order settings)."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if state.get("base") != clip.identity:
        raise ValueError(f"{checkpoint} was trained from {state.get('base')}, not {clip.identity}")
    load_trainable(pair.wrapper, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    # workers split the stream among themselves, so their number is part of the data order: keep the run's
    resumed_workers = state.get("config", {}).get("num_workers")
    if isinstance(resumed_workers, int):
        config = config.model_copy(update={"num_workers": resumed_workers})
    saved_split = state.get("config", {}).get("split", "samples")
    if saved_split != config.split:  # the split among ranks is too, and it sets the epoch's sample count
        raise ValueError(f"{checkpoint} was trained with split: {saved_split}; resume with it, or use a new --out")
    return state["epoch"], state["batches_done"], state["step"], config


def _epoch_batches(urls: list[str], clip, decoder, config: TrainConfig, epoch: int, rank: int, world: int,
                   limit: int, device: torch.device):  # fmt: skip
    """The epoch's batches for this rank, decoded by DataLoader workers when there are any."""
    preprocess = None if decoder is not None else clip.preprocess  # None: images reach the step encoded
    stream = quad_pipeline(urls, preprocess, clip.tokenizer, clip.image_size, epoch=epoch,
                           batch_size=config.batch_size, seed=config.seed, schedule=config.schedule,
                           rank=rank, world_size=world, limit=limit, text_trim=text_trim(clip.model),
                           split=config.split)  # fmt: skip
    if config.num_workers:
        stream = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda", prefetch_factor=4)  # fmt: skip
    return stream


@dataclass
class _Run:
    """One training run's state between optimiser steps: what a checkpoint saves and the loop advances."""

    clip: Any
    config: TrainConfig
    out_dir: Path
    rank: int
    world: int
    device: Any
    decoder: Any
    urls: list[str]
    weights: SaferWeights
    pair: Any
    optimizer: Any
    scheduler: Any
    per_rank: list[int]
    total_steps: int
    log: Any = None
    step: int = 0
    start_epoch: int = 0
    skip_batches: int = 0

    def save(self, epoch: int, batches_done: int) -> None:
        if self.rank == 0:
            self.log.flush()
            _save(self.out_dir / "last.pt", {
                "trainable": trainable_state(self.pair.wrapper), "base": self.clip.identity,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                "batches_done": batches_done, "step": self.step, "rng": torch.get_rng_state(),
                "config": self.config.model_dump()})  # fmt: skip

    def optimiser_step(self, epoch: int, loss: torch.Tensor, parts: dict, keys: list[str], on_step) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.log.add({"step": self.step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], "keys": keys},
                     loss, parts)  # fmt: skip
        if on_step is not None:
            on_step(self.step, self.total_steps, self.log.last_loss)

    def epoch(self, epoch: int, stop_after: int | None, on_step) -> bool:
        """One epoch's stream (from where a resumed run stopped); True when ``stop_after`` ended the run."""
        c = self.config
        stream = _epoch_batches(self.urls, self.clip, self.decoder, c, epoch, self.rank, self.world,
                                self.per_rank[epoch], self.device)  # fmt: skip
        done, pending, keys = 0, 0, []
        loss, parts = torch.zeros(()), {}
        autocast = autocast_for(self.device, c.precision)
        for batch in stream:
            done += 1
            if epoch == self.start_epoch and done <= self.skip_batches:
                continue  # consumed before the checkpoint: same stream, same order
            on_device = batch_to_device(batch, self.device, self.decoder)  # outside autocast: fp32 pixels
            with autocast:
                loss, parts = self.pair.loss(on_device, c.method, self.weights)
            (loss / c.grad_accum).backward()
            keys += batch["key"]
            pending += 1
            if pending < c.grad_accum:
                continue
            self.optimiser_step(epoch, loss, parts, keys, on_step)
            pending, keys = 0, []
            stop = stop_after is not None and self.step >= stop_after
            if self.step % c.checkpoint_every == 0 or stop:
                self.save(epoch, done)
            if stop:
                return True
        if pending:  # the epoch's last micro-batches
            self.optimiser_step(epoch, loss, parts, keys, on_step)
        self.save(epoch + 1, 0)
        return False


def _start(clip, shard_dir: Path, out_dir: Path, config: TrainConfig) -> _Run:
    """The run's model pair, optimiser, schedule and data plan, resumed from ``out_dir/last.pt`` if it exists."""
    from saferclip_data.training.losses import weights_from

    _checked(config)
    rank, world = process_group()
    device = device_for(config)
    config = config.model_copy(update={"num_workers": loader_workers(config.num_workers, device)})
    decoder = device_decoder(clip, config.decode, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no training tars in {shard_dir}")
    config = config.model_copy(update={"split": resolve_split(config.split, len(urls), world)})
    pair = _trained_pair(clip, config, device, world)
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")  # fmt: skip
    per_rank = [samples_per_rank(shard_dir, urls, e, config, world) for e in range(config.epochs)]
    total_steps = max(1, sum(math.ceil(n / config.batch_size / config.grad_accum) for n in per_rank))
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, total_steps)
    run = _Run(clip, config, out_dir, rank, world, device, decoder, urls, weights_from(config.weights), pair,
               optimizer, scheduler, per_rank, total_steps)  # fmt: skip
    checkpoint = out_dir / "last.pt"
    if checkpoint.is_file():
        run.start_epoch, run.skip_batches, run.step, run.config = _resume(checkpoint, clip, pair, optimizer,
                                                                          scheduler, config, device)  # fmt: skip
    if rank == 0:
        _truncate_log(out_dir / "log.jsonl", run.step)  # steps after the checkpoint are done again
    trackers = Trackers(run.config.log_dir, run.config.wandb, out_dir / "wandb", run.config.model_dump()) \
        if rank == 0 and (run.config.log_dir or run.config.wandb) else None  # fmt: skip
    run.log = StepLog(out_dir / "log.jsonl" if rank == 0 else None, run.config.log_every, trackers)
    return run


def train(
    clip,
    shard_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    stop_after: int | None = None,
    on_step: Callable[[int, int, float | None], None] | None = None,
) -> dict:
    """Train ``clip.model`` in place on the quad shards in ``shard_dir``; resumes from ``out_dir/last.pt``.

    Writes ``out_dir/log.jsonl`` (one line per optimiser step: step, epoch, loss, terms, the batch's keys; the
    same numbers to TensorBoard and wandb where ``config.log_dir`` / ``config.wandb`` ask),
    checkpoints, and at the end ``out_dir/model.pt``: the fine-tuned model as a plain open_clip state dict
    (adapters merged), loadable as ``model.pretrained``. ``stop_after`` ends the run after that many optimiser
    steps (for tests and budgets). ``on_step(step, total_steps, last_logged_loss)`` follows progress.
    """
    run = _start(clip, shard_dir, out_dir, config)
    stopped, epoch = False, run.start_epoch
    for epoch in range(run.start_epoch, run.config.epochs):
        stopped = run.epoch(epoch, stop_after, on_step)
        if stopped:
            break
    run.log.close()
    if run.rank == 0 and not stopped:
        export = merged(copy.deepcopy(run.pair.wrapper)).to("cpu")
        _save(out_dir / "model.pt", export.state_dict())
    return {"step": run.step, "epoch": epoch if stopped else run.config.epochs, "stopped": stopped}


def load_checkpoint(clip, path: Path):
    """Put a trainer checkpoint (``last.pt``) into ``clip.model`` (adapters merged); returns ``clip``.

    A plain state dict (``model.pt``, or any open_clip checkpoint) loads as it is."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "trainable" not in state:
        clip.model.load_state_dict(state.get("state_dict", state))
        return clip
    if state.get("base") != clip.identity:
        raise ValueError(f"{path} was trained from {state.get('base')}, not {clip.identity}")
    wrapper = attach(clip.model, TrainConfig.model_validate(state["config"]).adapter())
    load_trainable(wrapper, state["trainable"])
    clip.model = merged(wrapper).eval()
    return clip
