"""Each loss against values computed by hand on 2-D vectors whose cosines are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from saferclip_data.training.losses import (
    SAFECLIP_LAMBDAS,
    Embeddings,
    SaferWeights,
    cosine_distance,
    info_nce,
    relative_redirection,
    safeclip_loss,
    saferclip_loss,
    weights_from,
)

X, Y = [1.0, 0.0], [0.0, 1.0]
D = [math.sqrt(0.5), math.sqrt(0.5)]  # 45 degrees: cos with X or Y is sqrt(1/2)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_cosine_distance_normalises_and_averages():
    # cos = 1 (scaled copy) and cos = 0: mean of (0, 1)
    assert cosine_distance(t([2, 0], Y), t(X, X)).item() == pytest.approx(0.5)


def test_info_nce_by_hand():
    # logits [[1/tau, 0], [0, 1/tau]] -> each row: log(1 + exp(-1/tau))
    assert info_nce(t(X, Y), t(X, Y), tau=0.5).item() == pytest.approx(math.log1p(math.exp(-2)))
    # swapped keys: every positive is the orthogonal one -> log(1 + exp(1/tau))
    assert info_nce(t(X, Y), t(Y, X), tau=0.5).item() == pytest.approx(math.log1p(math.exp(2)))


def test_losses_of_bf16_embeddings_are_computed_in_fp32_even_under_autocast():
    """Embeddings leave a bf16 step in bf16; near cos = 1 bf16 steps by 0.004 and τ = 0.01 logits by 0.4, so the
    losses upcast: the result equals the fp32 computation on the same (bf16) embeddings."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    b = (a + 0.01 * torch.randn(64, 32, generator=g)).bfloat16()
    a = a.bfloat16()
    want_distance = cosine_distance(a.float(), b.float()).item()
    want_nce = info_nce(a.float(), b.float()).item()
    assert 0 < want_distance < 1e-3  # far below bf16's step near 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance, nce = cosine_distance(a, b), info_nce(a, b)
    assert distance.dtype == nce.dtype == torch.float32
    assert distance.item() == pytest.approx(want_distance, rel=1e-4)
    assert nce.item() == pytest.approx(want_nce, rel=1e-4)


def test_relative_redirection_uses_only_the_own_unsafe_item_as_negative():
    value = relative_redirection(t(X, X), own_unsafe=t(X, Y), safe_target=t(Y, X)).item()
    assert value == pytest.approx((softplus(1) + softplus(-1)) / 2)
    # other rows of the batch play no part: changing row 1 leaves row 0's contribution alone
    only_first = relative_redirection(t(X), own_unsafe=t(X), safe_target=t(Y)).item()
    assert only_first == pytest.approx(softplus(1))


def _batch(with_images: bool = True) -> Embeddings:
    img = (lambda *rows: t(*rows)) if with_images else (lambda *rows: None)
    return Embeddings(
        unsafe_image=img(X, D),  # V(v*)
        unsafe_text=t(D, Y),  # T(t*)
        safe_image=img(X, Y),  # V(v)
        safe_text=t(X, D),  # T(t)
        ref_unsafe_image=img(Y, Y),  # V0(v*)
        ref_unsafe_text=t(X, X),  # T0(t*)
        ref_safe_image=img(X, X),  # V0(v)
        ref_safe_text=t(X, Y),  # T0(t)
        target_image=img(Y, X),  # V0(v̂)
        target_text=t(Y, D),  # T0(t̂)
    )


def test_saferclip_loss_by_hand():
    r = math.sqrt(0.5)
    expected = {
        # softplus(cos(V(v*), T0(t*)) - cos(V(v*), T0(t̂))): rows (X: 1 - 0), (D: r - 1)
        "relative_image": (softplus(1) + softplus(r - 1)) / 2,
        # softplus(cos(T(t*), V0(v*)) - cos(T(t*), V0(v̂))): rows (D: r - r), (Y: 1 - 0)
        "relative_text": (softplus(0) + softplus(1)) / 2,
        "proximity_image": ((1 - 0) + (1 - r)) / 2,  # 1 - cos(V(v*), V0(v̂))
        "proximity_text": ((1 - r) + (1 - r)) / 2,  # 1 - cos(T(t*), T0(t̂)): (D, Y) and (Y, D)
        "preserve_image": ((1 - 1) + (1 - 0)) / 2,  # 1 - cos(V(v), V0(v))
        "preserve_text": ((1 - 1) + (1 - r)) / 2,  # 1 - cos(T(t), T0(t))
    }
    # cross: InfoNCE(T(t) vs V0(v) = [X, X]) is log 2 per row (both keys equal); InfoNCE(V(v) vs T0(t) = [X, Y])
    tau = 0.01
    nce_t = math.log(2)
    nce_v = math.log1p(math.exp(-1 / tau))  # rows X and Y against keys X, Y: positive 1/tau, other 0
    expected["preserve_cross"] = (nce_t + nce_v) / 2
    weights = SaferWeights(relative_image=2.0, preserve_cross=0.5)
    total, parts = saferclip_loss(_batch(), weights)
    for name, value in expected.items():
        assert parts[name] == pytest.approx(value, abs=1e-6), name
    want = sum(getattr(weights, name) * value for name, value in expected.items())
    assert total.item() == pytest.approx(want, abs=1e-5)


def test_text_only_batch_trains_text_terms_only():
    total, parts = saferclip_loss(_batch(with_images=False))
    assert set(parts) == {"proximity_text", "preserve_text"}
    r = math.sqrt(0.5)
    assert total.item() == pytest.approx((1 - r) + (1 - r) / 2, abs=1e-6)  # proximity_text + preserve_text


def test_safeclip_loss_by_hand_with_normalised_lambdas():
    r = math.sqrt(0.5)
    tau = 0.01
    terms = {
        "text_safe": ((1 - 1) + (1 - r)) / 2,  # T(t) vs T0(t)
        "text_nsfw": ((1 - r) + (1 - 1)) / 2,  # T(t*)=[D, Y] vs T0(t)=[X, Y]
        "vision_safe": ((1 - 1) + (1 - 0)) / 2,  # V(v)=[X, Y] vs V0(v)=[X, X]
        "vision_nsfw": ((1 - 1) + (1 - r)) / 2,  # V(v*)=[X, D] vs V0(v)=[X, X]
        "safe_text_to_vref": math.log(2),  # keys V0(v) are equal: every row is log 2
        "unsafe_text_to_vref": math.log(2),
        "vision_to_tref": math.log1p(math.exp(-1 / tau)),  # V(v)=[X, Y] vs T0(t)=[X, Y]
        # V(v*)=[X, D] vs T0(t)=[X, Y]: row X -> log(1+e^{-1/tau}); row D: logits equal (r/tau each) -> log 2
        "unsafe_vision_to_tref": (math.log1p(math.exp(-1 / tau)) + math.log(2)) / 2,
    }
    total, parts = safeclip_loss(_batch())
    for name, value in terms.items():
        assert parts[name] == pytest.approx(value, abs=1e-6), name
    norm = sum(SAFECLIP_LAMBDAS.values())
    assert total.item() == pytest.approx(sum(SAFECLIP_LAMBDAS[k] / norm * v for k, v in terms.items()), abs=1e-5)


def test_gradients_reach_only_the_trained_side():
    batch = _batch()
    trained = [batch.unsafe_image, batch.unsafe_text, batch.safe_image, batch.safe_text]
    frozen = [batch.ref_safe_image, batch.ref_safe_text, batch.target_image, batch.target_text]
    for x in trained:
        x.requires_grad_(True)
    total, _ = saferclip_loss(batch)
    total.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in trained)
    assert all(not x.requires_grad and x.grad is None for x in frozen)


def test_unknown_weight_names_are_refused():
    assert weights_from({"relative_text": 0.5}).relative_text == 0.5
    with pytest.raises(ValueError, match="relativ_text"):
        weights_from({"relativ_text": 0.5})


def test_recall_at_k_by_hand():
    from saferclip_data.training.evaluate import recall_at_k, retrieval_table

    eye = torch.eye(4)
    assert recall_at_k(eye, eye, torch.arange(4)) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    # query i's hit is row (i+1) % 4, which is orthogonal to it while row i is identical: rank 1 for all
    assert recall_at_k(eye, eye, (torch.arange(4) + 1) % 4, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    # unsafe captions that sit exactly on their unsafe images: found among safe images only by chance,
    # but in a safe+unsafe gallery they retrieve the unsafe image first
    v, t = torch.eye(6)[:3], torch.eye(6)[:3]
    v_star = t_star = torch.eye(6)[3:]
    table = retrieval_table(v, t, v_star, t_star + 0.1 * v)
    assert table["T->V safe"]["R@1"] == 1.0 and table["V->T safe+unsafe"]["R@1"] == 1.0
    assert table["T*->V safe"]["R@1"] == 1.0  # only its safe partner has a positive cosine
    assert table["T*->V safe+unsafe"]["R@1"] == 0.0  # its own unsafe image is closer
