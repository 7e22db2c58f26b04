"""What training and evaluation take from a recipe and its finished build: the training settings with the
command line's overrides, the quadruplet tars, the model the recipe names, and the benchmark, held-out records,
images and zero-shot sets every model of a comparison is measured on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saferclip_data.pipeline.errors import UserError
from saferclip_data.training.config import EvaluationConfig, TrainConfig


def recipe_clip(model):
    """The model a recipe's ``model:`` section names, freshly loaded (the toy world's weights included)."""
    from saferclip_data.models.clip import load_recipe_clip

    return load_recipe_clip(model.arch, model.pretrained, init_seed=model.init_seed, cache_dir=model.cache_dir)


def finished_shards(pipeline) -> Path:
    """The build's quadruplet tars, or a one-line error when its shards stage has not finished."""
    wd = pipeline.workdir
    shard_dir = wd.stage_dir("shards") / "quad"
    if (wd.manifest("shards") or {}).get("complete"):
        wd.pull("shards", "quad/*")  # a bucket's work dir: the tars copied to this node's mirror
    if not (wd.manifest("shards") or {}).get("complete") or not shard_dir.is_dir():
        raise UserError(f"{wd.root}: no finished shards stage; add stages.shards to the recipe and run build first")
    return shard_dir


def train_dir(pipeline, method: str) -> Path:
    """Where ``train`` writes a method's run in the work dir; of a bucket's, an earlier run's checkpoint (to
    resume from) is copied to this node's mirror first."""
    pipeline.workdir.pull("train", f"{method}/*")
    return pipeline.workdir.root / "train" / method


def training_config(pipeline, overrides: dict) -> TrainConfig:
    """The recipe's ``training:`` section with the command line's overrides (None = not given) applied."""
    section: TrainConfig = getattr(pipeline.recipe, "training", None) or TrainConfig()
    settings = section.model_dump()
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["method"] not in ("saferclip", "safeclip"):
        raise UserError(f"--method: '{settings['method']}' is not saferclip or safeclip")
    if settings["finetune"] not in ("lora", "full"):
        raise UserError(f"--finetune: '{settings['finetune']}' is not lora or full")
    return TrainConfig(**settings)


@dataclass
class EvaluationInputs:
    """What every model of a comparison is measured on, read and embedded once."""

    model: Any  # the recipe's model section
    rows: list[dict]
    heldout: list[dict]
    images: dict[str, bytes]
    sets: dict[str, tuple[Path, list[str]]]
    original: Any = None
    base: dict = field(default_factory=dict)

    def fresh(self):
        """The recipe's model as loaded before any fine-tuning."""
        return recipe_clip(self.model)

    def figures(self, clip) -> dict:
        from saferclip_data.training.evaluate import evaluate

        toy = self.model.arch.startswith("toy-")
        return evaluate(clip, self.original, self.rows, self.images, self.base, toy, self.heldout, self.sets)


def evaluation_inputs(pipeline, zero_shot: list[Path] | None = None) -> EvaluationInputs:
    """The benchmark export, the held-out split's quadruplets, their images and the zero-shot sets of a finished
    build (one-line errors for what is missing), with the base model's benchmark embeddings for drift."""
    from saferclip_data.stages.samples import source_rows
    from saferclip_data.training.evaluate import benchmark_rows, embed_benchmark, heldout_rows

    wd = pipeline.workdir
    if not (wd.manifest("benchmark") or {}).get("complete"):
        raise UserError(f"{wd.root}: no finished benchmark stage; add stages.benchmark to the recipe and build")
    section: EvaluationConfig = getattr(pipeline.recipe, "evaluation", None) or EvaluationConfig()
    sets = {z.name: (Path(z.path), z.templates) for z in section.zero_shot}
    sets.update({p.name: (p, ["a photo of a {}."]) for p in zero_shot or []})
    for name, (folder, _) in sets.items():
        if not folder.is_dir():
            raise UserError(f"zero-shot set '{name}': no folder {folder}")
    splits = section.heldout_splits
    if splits is None:
        shards = pipeline.recipe.stages.shards
        splits = list(shards.exclude_splits) if shards else []
    rows = benchmark_rows(wd.stage_dir("benchmark"))
    heldout = heldout_rows(wd, splits) if splits else []
    keys = {r[k] for r in rows + heldout for k in ("safe_key", "unsafe_key")}
    images = {k: r["image"] for k, r in source_rows(wd, keys).items() if r["image"]}
    heldout = [r for r in heldout if r["safe_key"] in images and r["unsafe_key"] in images]
    inputs = EvaluationInputs(pipeline.recipe.model, rows, heldout, images, sets)
    inputs.original = inputs.fresh()
    inputs.base = embed_benchmark(inputs.original, rows, images)
    return inputs
