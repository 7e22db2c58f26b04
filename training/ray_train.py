"""Training on a Ray cluster: Ray Train's TorchTrainer runs :func:`training.trainer.train` on N workers.

It fits cleanly because the trainer already speaks torch.distributed: Ray Train starts the workers, sets up the
process group (gloo on CPUs, NCCL on GPUs) and gives each worker its device; ``train`` finds the group
initialised and wraps its encoders in DistributedDataParallel exactly as under torchrun. The shards, the output
folder and its checkpoints must be on a file system every node sees, as for ``build``; rerunning resumes from
``last.pt`` there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from saferclip_data.training.config import TrainConfig


def _worker_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from saferclip_data.models.clip import load_recipe_clip
    from saferclip_data.training.trainer import train

    config = TrainConfig(**cfg["config"]).model_copy(update={"device": str(ray.train.torch.get_device())})
    clip = load_recipe_clip(**cfg["model"])
    out_dir = Path(cfg["out_dir"])
    result = train(clip, Path(cfg["shard_dir"]), out_dir, config, stop_after=cfg["stop_after"])
    if ray.train.get_context().get_world_rank() == 0:
        (out_dir / "ray-result.json").write_text(json.dumps(result))
    ray.train.report({"step": result["step"]})


def train_on_ray(
    model: dict,
    shard_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    workers: int,
    *,
    address: str | None = None,
    use_gpu: bool | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run the trainer on ``workers`` Ray Train workers (one GPU each where the cluster has GPUs); ``model`` holds
    ``load_clip``'s arguments. Returns rank 0's {step, epoch, stopped}."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    loop_config = {"config": config.model_dump(), "model": model, "shard_dir": str(shard_dir.resolve()),
                   "out_dir": str(out_dir.resolve()), "stop_after": stop_after}  # fmt: skip
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="saferclip-train", storage_path=str((out_dir / "ray").resolve())),
    )
    result_file = out_dir / "ray-result.json"
    result_file.unlink(missing_ok=True)
    trainer.fit()
    return json.loads(result_file.read_text())
