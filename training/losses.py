"""Losses of SaFeR-CLIP and of the Safe-CLIP baseline, each a small function of embeddings.

Notation (the SaFeR-CLIP paper's, arXiv 2511.16743; docs/method.md maps each term to its code): V, T are the
encoders being trained, V0, T0 the frozen reference copy; v, t a safe image and caption; v*, t* their unsafe
counterparts; v̂, t̂ the mined nearest safe target. Every function takes embeddings of shape (batch, dim),
L2-normalises them itself, and returns a scalar tensor; rows that do not exist (a text-only record has no image)
are left out by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

TAU = 0.01  # InfoNCE temperature of Safe-CLIP, kept by SaFeR-CLIP


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in fp32 whatever the embeddings' dtype: near 1, where the preservation terms
    live, bf16 resolves steps of 0.004 only."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(1 − cos(a_i, b_i)): pulls each row of ``a`` onto the matching row of ``b``."""
    return (1 - _cos(a, b)).mean()


def info_nce(queries: torch.Tensor, keys: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Cross-entropy of each query against all keys of the batch, its own row being the positive.

    One direction only: the queries come from the trained encoder, the keys from the frozen reference, so only
    the trained side is pushed (as in Safe-CLIP's cross-modal terms).
    """
    with torch.autocast(queries.device.type, enabled=False):  # fp32 logits: at τ = 0.01 bf16 would step by 0.4
        logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / tau
        return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def relative_redirection(query: torch.Tensor, own_unsafe: torch.Tensor, safe_target: torch.Tensor) -> torch.Tensor:
    """SaFeR-CLIP's relative cross-modal loss: mean softplus(cos(q, own unsafe) − cos(q, safe target)).

    The only negative is the sample's own unsafe item (no in-batch negatives, which would push valid safe
    alternatives away). Image side: q = V(v*), own = T0(t*), target = T0(t̂); text side: q = T(t*), own =
    V0(v*), target = V0(v̂).
    """
    return F.softplus(_cos(query, own_unsafe) - _cos(query, safe_target)).mean()


@dataclass(frozen=True)
class SaferWeights:
    """Weights of the SaFeR-CLIP terms (recipe: training.weights)."""

    relative_image: float = 1.0
    relative_text: float = 1.0
    proximity_image: float = 1.0
    proximity_text: float = 1.0
    preserve_image: float = 1.0
    preserve_text: float = 1.0
    preserve_cross: float = 1.0


@dataclass
class Embeddings:
    """One batch, trained (V, T) and frozen (V0, T0) embeddings; None where the batch lacks the modality."""

    unsafe_image: torch.Tensor | None  # V(v*)
    unsafe_text: torch.Tensor  # T(t*)
    safe_image: torch.Tensor | None  # V(v)
    safe_text: torch.Tensor  # T(t)
    ref_unsafe_image: torch.Tensor | None  # V0(v*)
    ref_unsafe_text: torch.Tensor  # T0(t*)
    ref_safe_image: torch.Tensor | None  # V0(v)
    ref_safe_text: torch.Tensor  # T0(t)
    target_image: torch.Tensor | None = None  # V0(v̂), the mined target (frozen; shipped in the shards)
    target_text: torch.Tensor | None = None  # T0(t̂)
    #: which batch rows the image fields belong to (indices into the text rows, or a bool mask over them);
    #: None = all rows. A batch mixing text-only and image records trains the image terms on the image rows
    #: and the text terms on all.
    image_rows: torch.Tensor | None = None

    def paired(self, text_side: torch.Tensor) -> torch.Tensor:
        """The rows of a text-side tensor that have images, aligned with the image fields."""
        if self.image_rows is None:
            return text_side
        if self.image_rows.dtype == torch.bool:
            return text_side[self.image_rows]
        return text_side.index_select(0, self.image_rows)

    @property
    def has_images(self) -> bool:
        return self.unsafe_image is not None and len(self.unsafe_image) > 0


def saferclip_loss(e: Embeddings, w: SaferWeights = SaferWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SaFeR-CLIP: relative cross-modal redirection, proximity uni-modal redirection, preservation of safe data.

    Returns the weighted sum and each term's value (for logging). Image terms run over the batch rows with images
    (``e.image_rows``) and are left out when there are none; text terms run over every row, so text-only records
    train the text tower only.
    """
    if e.target_text is None:
        raise ValueError("SaFeR-CLIP needs the mined targets' frozen text embeddings (target_text)")
    terms: dict[str, tuple[float, torch.Tensor]] = {
        "proximity_text": (w.proximity_text, cosine_distance(e.unsafe_text, e.target_text)),
        "preserve_text": (w.preserve_text, cosine_distance(e.safe_text, e.ref_safe_text)),
    }
    if e.has_images and e.target_image is not None:
        terms["relative_image"] = (
            w.relative_image,
            relative_redirection(e.unsafe_image, e.paired(e.ref_unsafe_text), e.paired(e.target_text)),
        )
        terms["relative_text"] = (
            w.relative_text,
            relative_redirection(e.paired(e.unsafe_text), e.ref_unsafe_image, e.target_image),
        )
        terms["proximity_image"] = (w.proximity_image, cosine_distance(e.unsafe_image, e.target_image))
    if e.has_images and e.safe_image is not None and e.ref_safe_image is not None:
        terms["preserve_image"] = (w.preserve_image, cosine_distance(e.safe_image, e.ref_safe_image))
        safe_text, ref_safe_text = e.paired(e.safe_text), e.paired(e.ref_safe_text)
        cross = (info_nce(safe_text, e.ref_safe_image) + info_nce(e.safe_image, ref_safe_text)) / 2
        terms["preserve_cross"] = (w.preserve_cross, cross)
    return _weighted(terms)


#: Safe-CLIP's default λ (its released training code), normalised to sum 1 in ``safeclip_loss``
SAFECLIP_LAMBDAS = {
    "text_safe": 0.1,  # T(t) ~ T0(t)
    "text_nsfw": 0.1,  # T(t*) -> T0(t)
    "vision_safe": 0.1,  # V(v) ~ V0(v)
    "vision_nsfw": 0.2,  # V(v*) -> V0(v)
    "safe_text_to_vref": 0.25,  # InfoNCE(T(t), V0(v))
    "unsafe_text_to_vref": 0.25,  # InfoNCE(T(t*), V0(v))
    "vision_to_tref": 0.25,  # InfoNCE(V(v), T0(t))
    "unsafe_vision_to_tref": 0.5,  # InfoNCE(V(v*), T0(t))
}


def safeclip_loss(
    e: Embeddings, lambdas: dict[str, float] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Safe-CLIP baseline: each unsafe item is pulled to its one fixed safe partner (uni-modal cosine and
    cross-modal InfoNCE with in-batch negatives), safe items are preserved; 8 terms, λ normalised to sum 1."""
    lam = {**SAFECLIP_LAMBDAS, **(lambdas or {})}
    terms: dict[str, tuple[float, torch.Tensor]] = {
        "text_safe": (lam["text_safe"], cosine_distance(e.safe_text, e.ref_safe_text)),
        "text_nsfw": (lam["text_nsfw"], cosine_distance(e.unsafe_text, e.ref_safe_text)),
    }
    if e.has_images and e.safe_image is not None and e.ref_safe_image is not None:
        safe_text, unsafe_text, ref_safe_text = (
            e.paired(e.safe_text),
            e.paired(e.unsafe_text),
            e.paired(e.ref_safe_text),
        )
        terms["vision_safe"] = (lam["vision_safe"], cosine_distance(e.safe_image, e.ref_safe_image))
        terms["vision_nsfw"] = (lam["vision_nsfw"], cosine_distance(e.unsafe_image, e.ref_safe_image))
        terms["safe_text_to_vref"] = (lam["safe_text_to_vref"], info_nce(safe_text, e.ref_safe_image))
        terms["unsafe_text_to_vref"] = (lam["unsafe_text_to_vref"], info_nce(unsafe_text, e.ref_safe_image))
        terms["vision_to_tref"] = (lam["vision_to_tref"], info_nce(e.safe_image, ref_safe_text))
        terms["unsafe_vision_to_tref"] = (lam["unsafe_vision_to_tref"], info_nce(e.unsafe_image, ref_safe_text))
    total_weight = sum(weight for weight, _ in terms.values())
    return _weighted({k: (weight / total_weight, v) for k, (weight, v) in terms.items()})


def _weighted(terms: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum and each term's detached value, left on the device: reading a value waits for the GPU,
    so the trainer reads them only when it writes its log."""
    total = sum(weight * value for weight, value in terms.values())
    return total, {name: value.detach() for name, (_, value) in terms.items()}


def weights_from(mapping: dict[str, float] | None) -> SaferWeights:
    """SaferWeights from a recipe mapping; an unknown name is an error naming the valid ones."""
    mapping = mapping or {}
    known = {f.name for f in fields(SaferWeights)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"unknown SaFeR-CLIP loss weight {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return SaferWeights(**mapping)
