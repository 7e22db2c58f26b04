"""The tiny CLIP pretrained on the toy world: its zero-shot figures, and loading it like any open_clip model."""

from __future__ import annotations

import json

import pytest

from saferclip_data.models.clip import load_clip
from saferclip_data.toyworld import CATEGORIES
from saferclip_data.toyworld.pretrain import PretrainConfig, checkpoint_path


@pytest.fixture(scope="module")
def pretrained(cli_module):
    code, out, err = cli_module("toy", "pretrain")
    assert code == 0, err
    path = checkpoint_path(PretrainConfig())
    return path, json.loads(path.with_name("metrics.json").read_text()), out


@pytest.mark.slow
def test_pretrain_prints_its_figures_and_caches(pretrained, cli_module):
    path, metrics, out = pretrained
    assert "zero-shot place accuracy" in out and "image->text R@1" in out
    assert f"{metrics['place_accuracy']:.1%}" in out
    assert metrics["place_accuracy"] >= 0.85
    assert metrics["image_to_text_r1"] >= 0.45
    mtime = path.stat().st_mtime_ns
    code, out, _ = cli_module("toy", "pretrain")  # cached: no training, same figures
    assert code == 0 and "from cache" in out and path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_zero_shot_unsafe_detection_per_category(pretrained):
    _, metrics, _ = pretrained
    assert set(metrics["unsafe_auroc"]) == set(CATEGORIES)
    assert min(metrics["unsafe_auroc"].values()) >= 0.9, metrics["unsafe_auroc"]


@pytest.mark.slow
def test_zero_shot_object_accuracy(pretrained):
    _, metrics, out = pretrained
    assert f"{metrics['object_accuracy']:.1%}" in out
    assert metrics["object_accuracy"] >= 0.75


@pytest.mark.slow
def test_unsafe_captions_are_nearest_to_their_safe_twins(pretrained):
    # what text->text mining relies on (see minimal_edit_loss); images are not taught it
    _, metrics, out = pretrained
    assert metrics["nearest_safe_precision"]["text"] >= 0.9
    assert f"{metrics['nearest_safe_precision']['text']:.1%}" in out


@pytest.mark.slow
def test_toy_checkpoint_loads_through_the_same_function(pretrained):
    from saferclip_data.models.clip import WEIGHTS, load_recipe_clip
    from saferclip_data.toyworld.plugins import ToyWeights

    path, _, _ = pretrained
    by_tag = load_recipe_clip("toy-resnet-tiny", "toy-world")
    by_path = load_clip("toy-resnet-tiny", str(path))
    assert by_tag.identity == by_path.identity
    assert by_tag.identity != load_clip("toy-resnet-tiny", None).identity
    with pytest.raises(ValueError, match="load_recipe_clip"):  # the model floor does not make toy weights itself
        load_clip("toy-resnet-tiny", "toy-world")
    # found through the package's entry point, not because a test imported the provider
    assert isinstance(WEIGHTS.find("toy-world"), type) and WEIGHTS.find("toy-world") is ToyWeights
