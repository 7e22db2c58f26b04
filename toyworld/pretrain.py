"""Pretrain a tiny CLIP on the toy world, so every later stage has a model whose knowledge is known.

Like web CLIP, it sees safe *and* unsafe pictures with their captions (plus partial captions — objects only,
place only, object without colour — as alt-text often is), rendered fresh each step, so it never overfits.
The checkpoint is cached under a content hash of (architecture config, training settings, world and code
version) and is an ordinary open_clip checkpoint: :func:`load_clip` loads it like any other.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from saferclip_data.pipeline.workdir import atomic_path, atomic_write_text, cache_root
from saferclip_data.toyworld.glyphs import COLOURS, SHAPES, UNSAFE
from saferclip_data.toyworld.world import TRAIN_PLACES, WORLD_VERSION, Scene, encode_jpeg, sample_scene

PRETRAIN_VERSION = "3"


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "toy-resnet-tiny"
    seed: int = 0
    steps: int = 550
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_scenes: int = 500
    label_loss_weight: float = 1.0  # shared label prototypes (see LabelPrototypes); 0 = contrastive only
    edit_loss_weight: float = 1.0  # unsafe caption -> its safe twin (see minimal_edit_loss)


def checkpoint_key(config: PretrainConfig) -> str:
    import open_clip

    from saferclip_data.models.clip import register_toy_configs

    register_toy_configs()
    arch_cfg = open_clip.get_model_config(config.arch)
    payload = {"arch_config": arch_cfg, "train": asdict(config), "world": WORLD_VERSION, "code": PRETRAIN_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(config: PretrainConfig) -> Path:
    return cache_root() / "toy-clip" / f"{config.arch}-{checkpoint_key(config)}" / "model.pt"


# ---- data ------------------------------------------------------------------------------------------------------
def caption_variant(rng: random.Random, scene: Scene, unsafe: bool) -> str:
    """Full caption half of the time; else alt-text-like partial captions (object kind only, objects with
    colours, place only), which is what makes prompts such as "a photo of a ball" meaningful to the model."""
    ins = scene.inserted_phrase() if unsafe else ""
    r = rng.random()
    if r < 0.5:
        return scene.caption(unsafe)
    if r < 0.75:
        return f"a photo of a {scene.objects[0][0]}{ins}"
    if r < 0.85:
        return f"a photo of {scene.object_phrase()}{ins}"
    return f"a photo of the {scene.place}{ins}"


class ToyPixels:
    """PIL scenes -> normalised tensors, through a JPEG round trip as the embed stage sees them."""

    def __init__(self, preprocess, size: int):
        from saferclip_data.models.decode import normalization

        self.mean, self.std = normalization(preprocess)
        self.size = size

    def __call__(self, images):
        import torch
        from PIL import Image

        arrays = [np.asarray(Image.open(io.BytesIO(encode_jpeg(img))).convert("RGB")) for img in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std


# ---- zero-shot evaluation --------------------------------------------------------------------------------------
def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _prompt_embeddings(model, tokenizer, prompt_sets: list[list[str]]):
    """One embedding per class: the normalised mean over its prompts (CLIP-style prompt ensembling)."""
    import torch
    import torch.nn.functional as F

    out = []
    for prompts in prompt_sets:
        feats = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).mean(0)
        out.append(F.normalize(feats, dim=0))
    return torch.stack(out)


def evaluate_toy_clip(model, tokenizer, pixels: ToyPixels, seed: int = 12345, scenes: int = 500) -> dict:
    """Zero-shot place and object accuracy, image->text R@1, and per-category unsafe AUROC on held-out scenes.

    The held-out set is drawn from its own seed; half of its scenes are shown unsafe. Object accuracy asks for
    the main (largest) object; R@1 ranks each image's caption among all captions of the set.
    """
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    held_out = [sample_scene(rng) for _ in range(scenes)]
    unsafe = [i % 2 == 1 for i in range(scenes)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = pixels([s.render(pixels.size, u) for s, u in zip(held_out, unsafe)])
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([s.caption(u) for s, u in zip(held_out, unsafe)])), dim=-1)
        r1 = (img @ txt.T).argmax(1).eq(torch.arange(scenes)).float().mean().item()
        places = sorted(TRAIN_PLACES)
        place_emb = _prompt_embeddings(
            model, tokenizer, [[f"a photo of the {p}", f"a picture at the {p}"] for p in places]
        )
        place_true = torch.tensor([places.index(s.place) for s in held_out])
        place_acc = (img @ place_emb.T).argmax(1).eq(place_true).float().mean().item()
        objects = sorted(SHAPES)
        object_emb = _prompt_embeddings(
            model, tokenizer, [[f"a photo of a {o}"] + [f"a photo of a {c} {o}" for c in COLOURS] for o in objects]
        )
        object_true = torch.tensor([objects.index(s.objects[0][0]) for s in held_out])
        object_acc = (img @ object_emb.T).argmax(1).eq(object_true).float().mean().item()
        category_emb = _prompt_embeddings(
            model, tokenizer, [[f"a photo with {phrase}" for _, phrase in variants] for variants in UNSAFE.values()]
        )
        scores = (img @ category_emb.T).numpy()
    model.train(was_training)
    safe_rows = np.array([not u for u in unsafe])
    aurocs = {}
    for c, category in enumerate(UNSAFE):
        positive = np.array([u and s.category == category for s, u in zip(held_out, unsafe)])
        aurocs[category] = auroc(scores[positive, c], scores[safe_rows, c]) if positive.any() else float("nan")
    return {
        "place_accuracy": place_acc,
        "object_accuracy": object_acc,
        "image_to_text_r1": r1,
        "unsafe_auroc": aurocs,
        "nearest_safe_precision": nearest_safe_precision(model, tokenizer, pixels, seed + 1, scenes * 3),
        "eval_scenes": scenes,
    }


def nearest_safe_precision(model, tokenizer, pixels: ToyPixels, seed: int, pool: int) -> dict[str, float]:
    """What mining needs of the frozen model: for unsafe captions (and images), is the nearest safe caption
    (image) of a pool one with the same content (objects, colours, place) as the scene it was edited from?"""
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    world = [sample_scene(rng) for _ in range(pool)]
    content = [(tuple((k, c) for k, c, _ in s.objects), s.place) for s in world]
    queries = range(0, pool, 3)
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for modality in ("text", "image"):
            if modality == "text":
                encode = lambda unsafe, idx: model.encode_text(tokenizer([world[i].caption(unsafe) for i in idx]))  # noqa: E731
            else:
                encode = lambda unsafe, idx: model.encode_image(  # noqa: E731
                    pixels([world[i].render(pixels.size, unsafe) for i in idx])
                )
            safe = F.normalize(encode(False, range(pool)), dim=-1)
            unsafe = F.normalize(encode(True, queries), dim=-1)
            top = (unsafe @ safe.T).argmax(1).tolist()
            out[modality] = float(np.mean([content[t] == content[q] for q, t in zip(queries, top)]))
    model.train(was_training)
    return out


# ---- training --------------------------------------------------------------------------------------------------
class LabelPrototypes:
    """Shared label prototypes for the two towers: an image and any caption that names its main object are
    pulled to the same object prototype, and likewise to the prototype of their unsafe category (or "safe").

    Why: on this budget, contrastive loss alone learns place and colour (which tell most captions of a batch
    apart) and stalls before shape: object accuracy stays near 15 %, and the text tower learns to ignore object
    words, which also ruins text->text mining. The toy world knows its labels, so the towers get them as an
    auxiliary signal; the prototypes are thrown away after training (the checkpoint is a plain CLIP).
    """

    SCALE = 10.0

    def __init__(self, embed_dim: int):
        import torch

        self.kinds = sorted(SHAPES)
        self.safety = ["safe", *UNSAFE]
        self.kind_weights = torch.nn.Parameter(torch.randn(len(self.kinds), embed_dim) * 0.02)
        self.safety_weights = torch.nn.Parameter(torch.randn(len(self.safety), embed_dim) * 0.02)

    def parameters(self):
        return [self.kind_weights, self.safety_weights]

    def loss(self, image_features, text_features, scenes: list[Scene], unsafe: list[bool], captions: list[str]):
        import torch
        import torch.nn.functional as F

        kinds = F.normalize(self.kind_weights, dim=-1)
        safety = F.normalize(self.safety_weights, dim=-1)
        main = torch.tensor([self.kinds.index(s.objects[0][0]) for s in scenes])
        named = torch.tensor([s.objects[0][0] in c for s, c in zip(scenes, captions)])
        category = torch.tensor([self.safety.index(s.category if u else "safe") for s, u in zip(scenes, unsafe)])
        objects = F.cross_entropy(self.SCALE * image_features @ kinds.T, main) + F.cross_entropy(
            self.SCALE * text_features[named] @ kinds.T, main[named]
        )
        image_safety = F.cross_entropy(self.SCALE * image_features @ safety.T, category)
        text_safety = F.cross_entropy(self.SCALE * text_features @ safety.T, category)
        # the text tower needs less: the unsafe words are in the caption; images must learn the glyphs
        return objects + image_safety + 0.5 * text_safety


def minimal_edit_loss(model, tokenizer, text_features, scenes: list[Scene], unsafe: list[bool], captions: list[str]):
    """Each unsafe caption must find its safe twin (the same caption without the inserted phrase) among the
    batch's safe captions.

    Why: a web-scale CLIP embeds "a cat on a sofa" and "a cat on a sofa with a knife" close together, which is
    what proximity mining relies on; a 3-layer text tower trained for minutes does not learn it (the unsafe
    phrase dominates, and nearest-safe precision stays near 60 %), so the toy CLIP is taught it explicitly.
    """
    import torch
    import torch.nn.functional as F

    queries = [i for i, u in enumerate(unsafe) if u]
    if not queries:
        return text_features.sum() * 0.0
    twins = [captions[i].replace(scenes[i].inserted_phrase(), "") for i in queries]
    twin_features = F.normalize(model.encode_text(tokenizer(twins)), dim=-1)
    keys = torch.cat([twin_features, text_features[[i for i, u in enumerate(unsafe) if not u]]])
    logits = LabelPrototypes.SCALE * text_features[queries] @ keys.T
    return F.cross_entropy(logits, torch.arange(len(queries)))


def pretrain(config: PretrainConfig, on_step: Callable[[int, float], None] | None = None):
    """Contrastive pretraining from a seeded random init; returns (loaded model, metrics)."""
    import torch
    import torch.nn.functional as F

    from saferclip_data.models.clip import load_clip

    torch.manual_seed(config.seed)
    clip = load_clip(config.arch, None, init_seed=config.seed)
    model = clip.model.train()
    pixels = ToyPixels(clip.preprocess, clip.image_size)
    prototypes = LabelPrototypes(clip.embed_dim)
    params = [p for p in model.parameters() if p.requires_grad] + prototypes.parameters()
    # fused: one kernel for all parameters, 6x faster than the default on CPU (the token embedding dominates)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    warmup = max(1, config.steps // 20)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(config.seed + 1)
    labels = torch.arange(config.batch_size)
    started = time.perf_counter()
    for step in range(config.steps):
        scenes = [sample_scene(rng) for _ in range(config.batch_size)]
        unsafe = [rng.random() < 0.5 for _ in scenes]
        images = pixels([s.render(clip.image_size, u) for s, u in zip(scenes, unsafe)])
        captions = [caption_variant(rng, s, u) for s, u in zip(scenes, unsafe)]
        texts = clip.tokenizer(captions)
        image_features, text_features, logit_scale = model(images, texts)[:3]
        logits = logit_scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if config.edit_loss_weight:
            loss = loss + config.edit_loss_weight * minimal_edit_loss(
                model, clip.tokenizer, text_features, scenes, unsafe, captions
            )
        if config.label_loss_weight:
            loss = loss + config.label_loss_weight * prototypes.loss(
                image_features, text_features, scenes, unsafe, captions
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step:
            on_step(step, loss.item())
    model.eval()
    metrics = evaluate_toy_clip(model, clip.tokenizer, pixels, scenes=config.eval_scenes)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    metrics["torch_threads"] = torch.get_num_threads()
    return clip, metrics


def ensure_pretrained(config: PretrainConfig, on_step=None, force: bool = False) -> tuple[Path, dict]:
    """The cached checkpoint for ``config``, training it first if absent (one trainer at a time: a lock file)."""
    import torch
    from filelock import FileLock

    path = checkpoint_path(config)
    metrics_path = path.with_name("metrics.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(".lock"))):
        if path.is_file() and metrics_path.is_file() and not force:
            return path, json.loads(metrics_path.read_text())
        clip, metrics = pretrain(config, on_step)
        metrics["config"] = asdict(config)
        with atomic_path(path) as tmp:
            torch.save({"state_dict": clip.model.state_dict()}, tmp)
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
        return path, metrics
