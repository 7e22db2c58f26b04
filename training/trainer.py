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

import contextlib
import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import torch
import torch.distributed as dist

from saferclip_data.models.clip import CompileMode, text_trim
from saferclip_data.pipeline.workdir import atomic_path
from saferclip_data.training.adapters import attach, load_trainable, merged, trainable_state
from saferclip_data.training.config import TrainConfig
from saferclip_data.training.data import SPLITS, buckets_for_epoch, epoch_shard_order, quad_pipeline
from saferclip_data.training.losses import SaferWeights
from saferclip_data.training.reference import TrainedWithReference


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


def _process_group() -> tuple[int, int]:
    """(rank, world size): joins the process group a launcher set up through the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL wants each rank on its own GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loader_workers(setting: int | str, device: torch.device) -> int:
    """DataLoader processes: as set, or for "auto" one per CPU core up to 8 (one core spared for the step) when
    training on CUDA, so decoding never starves the GPU; none on a CPU, where they would take the step's cores."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def device_decoder(clip, setting: str, device: torch.device):
    """A ``DeviceDecoder`` when images are to be decoded on the training device: asked for ("device"), or
    "auto" on CUDA where the model's preprocessing can be reproduced there; None = PIL in the loader."""
    from saferclip_data.models.decode import DeviceDecoder, tensor_path_mismatch

    if setting not in ("auto", "cpu", "device"):
        raise ValueError(f"decode: '{setting}' is not auto, cpu or device")
    if setting == "cpu" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto" and tensor_path_mismatch(clip.preprocess, clip.image_size):
        return None
    return DeviceDecoder(clip.preprocess, clip.image_size, device)


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA by default (weights stay fp32 for the optimiser); fp32 otherwise."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: '{precision}' is not auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def reference_dtype(device: torch.device, precision: str, reference_precision: str) -> torch.dtype | None:
    """The frozen reference's weight dtype: bf16 where the step runs in bf16 (``auto``), or as asked; None = as
    the trained model (fp32)."""
    if reference_precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"reference_precision: '{reference_precision}' is not auto, fp32 or bf16")
    if reference_precision == "bf16" or (reference_precision == "auto" and uses_bf16(device, precision)):
        return torch.bfloat16
    return None


def autocast_for(device: torch.device, precision: str):
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


#: batch fields that stay on the host: they decide which rows go where, and reading them on the GPU would wait
HOST_FIELDS = frozenset({"has_image", "has_safe_image"})


def batch_to_device(batch: dict, device: torch.device, decoder=None) -> dict:
    """The batch on ``device`` (row flags stay on the host); encoded images decoded there by ``decoder``."""
    moved = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_FIELDS else v
        for k, v in batch.items()
    }
    return decoder(moved) if decoder is not None else moved


class StepLog:
    """log.jsonl, written every ``every`` steps: entries keep their loss values as device tensors until then,
    so the training step never waits for the GPU to report a number. ``flush`` before a checkpoint keeps the
    log and the checkpoint in step (resume truncates the log to the checkpoint's step)."""

    def __init__(self, path: Path | None, every: int):
        self.file = path.open("a") if path is not None else None
        self.every, self.pending, self.last_loss = every, [], None

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
        self.file.flush()
        self.pending = []

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()


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


def train(
    clip,
    shard_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    stop_after: int | None = None,
    on_step: Callable[[int, int, float | None], None] | None = None,
) -> dict:
    """Train ``clip.model`` in place on the quad shards in ``shard_dir``; resumes from ``out_dir/last.pt``.

    Writes ``out_dir/log.jsonl`` (one line per optimiser step: step, epoch, loss, terms, the batch's keys),
    checkpoints, and at the end ``out_dir/model.pt``: the fine-tuned model as a plain open_clip state dict
    (adapters merged), loadable as ``model.pretrained``. ``stop_after`` ends the run after that many optimiser
    steps (for tests and budgets). ``on_step(step, total_steps, last_logged_loss)`` follows progress.
    """
    from saferclip_data.training.losses import weights_from

    _checked(config)
    rank, world = _process_group()
    device = _device(config)
    config = config.model_copy(update={"num_workers": loader_workers(config.num_workers, device)})
    decoder = device_decoder(clip, config.decode, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no training tars in {shard_dir}")
    config = config.model_copy(update={"split": resolve_split(config.split, len(urls), world)})
    weights: SaferWeights = weights_from(config.weights)
    pair = _trained_pair(clip, config, device, world)
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")  # fmt: skip
    per_rank = [samples_per_rank(shard_dir, urls, e, config, world) for e in range(config.epochs)]
    total_steps = max(1, sum(math.ceil(n / config.batch_size / config.grad_accum) for n in per_rank))
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, total_steps)
    start_epoch, skip_batches, step = 0, 0, 0
    checkpoint = out_dir / "last.pt"
    if checkpoint.is_file():
        start_epoch, skip_batches, step, config = _resume(checkpoint, clip, pair, optimizer, scheduler, config, device)
    if rank == 0:
        _truncate_log(out_dir / "log.jsonl", step)  # steps after the checkpoint are done again
    log = StepLog(out_dir / "log.jsonl" if rank == 0 else None, config.log_every)
    autocast = autocast_for(device, config.precision)

    def save(epoch: int, batches_done: int) -> None:
        if rank == 0:
            log.flush()
            _save(checkpoint, {"trainable": trainable_state(pair.wrapper), "base": clip.identity,
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "epoch": epoch, "batches_done": batches_done, "step": step,
                               "rng": torch.get_rng_state(), "config": config.model_dump()})  # fmt: skip

    def optimiser_step(epoch: int, loss: torch.Tensor, parts: dict, keys: list[str]) -> None:
        nonlocal step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.add({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "keys": keys}, loss, parts)
        if on_step is not None:
            on_step(step, total_steps, log.last_loss)

    stopped = False
    for epoch in range(start_epoch, config.epochs):
        stream = _epoch_batches(urls, clip, decoder, config, epoch, rank, world, per_rank[epoch], device)
        done, pending = 0, 0
        keys: list[str] = []
        loss, parts = torch.zeros(()), {}
        for batch in stream:
            done += 1
            if epoch == start_epoch and done <= skip_batches:
                continue  # consumed before the checkpoint: same stream, same order
            # decoded outside autocast: pixels stay fp32 as the PIL path's
            on_device = batch_to_device(batch, device, decoder)
            with autocast:
                loss, parts = pair.loss(on_device, config.method, weights)
            (loss / config.grad_accum).backward()
            keys += batch["key"]
            pending += 1
            if pending < config.grad_accum:
                continue
            optimiser_step(epoch, loss, parts, keys)
            pending, keys = 0, []
            if step % config.checkpoint_every == 0 or (stop_after is not None and step >= stop_after):
                save(epoch, done)
            if stop_after is not None and step >= stop_after:
                stopped = True
                break
        if stopped:
            break
        if pending:  # the epoch's last micro-batches
            optimiser_step(epoch, loss, parts, keys)
        save(epoch + 1, 0)
    log.close()
    if rank == 0 and not stopped:
        export = merged(copy.deepcopy(pair.wrapper)).to("cpu")
        _save(out_dir / "model.pt", export.state_dict())
    return {"step": step, "epoch": epoch if stopped else config.epochs, "stopped": stopped}


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
