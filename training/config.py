"""The training and evaluation settings: one type each, read from the recipe and handed to the trainer as is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from saferclip_data.models.clip import CompileMode
from saferclip_data.pipeline.recipe import resolve_path

if TYPE_CHECKING:
    from saferclip_data.training.adapters import AdapterSettings

#: difficulty buckets admitted per epoch (epoch i trains on entry min(i, len - 1)): easy first, then harder
DEFAULT_SCHEDULE: tuple[tuple[str, ...], ...] = (("easy",), ("easy", "medium"), ("easy", "medium", "hard"))


class TrainConfig(BaseModel):
    """How to fine-tune: the recipe's optional ``training:`` section (the train command's options override it), and
    the trainer's one configuration, saved in every checkpoint so a resumed run trains as it started."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["saferclip", "safeclip"] = "saferclip"
    epochs: int = Field(default=3, gt=0, description="epochs; the progressive schedule reaches 'all' at epoch 3")
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_accum: int = Field(default=1, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=50, gt=0, description="optimiser steps between checkpoints")
    decode: Literal["auto", "cpu", "device"] = Field(
        default="auto",
        description="where training images are decoded: cpu (PIL in the DataLoader workers), device (batched "
        "nvJPEG + resize on the GPU), auto = device on CUDA where the model's preprocessing allows",
    )
    log_every: int = Field(
        default=10, gt=0, description="optimiser steps between log.jsonl writes (reading a loss waits for the GPU)"
    )
    schedule: list[list[Literal["easy", "medium", "hard"]]] = Field(
        default_factory=lambda: [list(b) for b in DEFAULT_SCHEDULE],
        min_length=1,
        description="difficulty buckets admitted per epoch; the last entry holds for later epochs",
    )
    weights: dict[str, float] = Field(default_factory=dict, description="SaFeR-CLIP loss weights by term name")
    finetune: Literal["lora", "full"] = Field(default="lora", description="LoRA adapters (the paper) or all weights")
    towers: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], min_length=1)
    lora_rank: int = Field(default=16, gt=0)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 autocast on CUDA")
    reference_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="weights of the frozen reference (T0, V0): auto = bf16 when the step runs in bf16 (it is never "
        "trained, and bf16 weights run faster than autocast over fp32 ones), fp32 = as the trained model",
    )
    compile: CompileMode | None = Field(
        default=None,
        description="torch.compile the towers of the frozen reference and of the trained model with this mode "
        "(fuses the layer norms, activations and casts around the matmuls; compiling takes the first steps, "
        "minutes for ViT-L/14); towers with LoRA attention layers stay eager; unset = eager",
    )
    split: Literal["auto", "samples", "tars"] = Field(
        default="auto",
        description="how DDP ranks share an epoch: samples = every rank reads every tar and keeps every N-th "
        "sample (all samples, any number of tars); tars = each rank reads only its own tars, so reading scales "
        "with the ranks (needs a tar per rank, and ranks train on as many samples as the one whose tars hold the "
        "fewest); auto = tars wherever there are more tars than ranks, else samples",
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader processes decoding images; auto = one per CPU core up to 8 (one spared) on CUDA, "
        "none on a CPU, where they would take cores from the step",
    )
    log_dir: str | None = Field(
        default=None, description="TensorBoard event files of the loss terms and learning rate (relative: against "
        "the recipe's folder); needs the track extra"
    )
    wandb: str | None = Field(
        default=None, description="a Weights & Biases project to log the same to (offline unless WANDB_MODE or a "
        "login says otherwise); needs the track extra"
    )

    _log_dir = field_validator("log_dir")(resolve_path)

    def adapter(self) -> AdapterSettings:
        from saferclip_data.training.adapters import AdapterSettings

        return AdapterSettings(self.finetune, tuple(self.towers), self.lora_rank, self.lora_alpha, self.lora_dropout)


class ZeroShotSet(BaseModel):
    """An image-folder data set (one sub-folder per class) for zero-shot accuracy in ``eval``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)

    _path = field_validator("path")(resolve_path)


class EvaluationConfig(BaseModel):
    """The recipe's optional top-level ``evaluation:`` section."""

    model_config = ConfigDict(extra="forbid")
    heldout_splits: list[str] | None = Field(
        default=None, description="splits to evaluate as a second retrieval table (default: shards.exclude_splits)"
    )
    zero_shot: list[ZeroShotSet] = Field(default_factory=list)
