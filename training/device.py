"""Where a training step runs: the process group, the device, bf16 autocast, the frozen reference's dtype, the
DataLoader's processes, and batches moved (and images decoded) onto the device."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from saferclip_data.training.config import TrainConfig


def process_group() -> tuple[int, int]:
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


def device_for(config: TrainConfig) -> torch.device:
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
