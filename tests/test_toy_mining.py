"""The demo recipe with the pretrained toy CLIP, checked against the toy world's ground truth.

This is the quality test of the safety stages: scoring must flag every category's unsafe records, and the mined
top-1 safe target must be the scene the unsafe record was edited from (or one with the same content), beating
the deliberately wrong given pairs. It builds the shipped demo recipe unchanged except for the work dir.
"""

from __future__ import annotations

import re

import pytest
import yaml

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.toyworld.audit import mining_figures, scoring_auroc

from conftest import REPO, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory, cli_module):
    base = tmp_path_factory.mktemp("demo")
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe["workdir"] = str(base / "work")
    path = write_recipe(base / "demo.yaml", recipe)
    code, _, err = cli_module("build", str(path), "--executor", "local", "--no-progress")
    assert code == 0, err
    return path, WorkDir(base / "work")


def test_zero_shot_scores_flag_every_category(demo_build):
    _, workdir = demo_build
    rows = scoring_auroc(workdir)
    assert len(rows) == 7
    for row in rows:
        assert row["unsafe_records"] >= 50, row
        assert row["image_auroc"] >= 0.9, row
        assert row["text_auroc"] >= 0.9, row


def test_text_mining_finds_the_source_scene(demo_build):
    _, workdir = demo_build
    figures = mining_figures(workdir, "text")
    # every unsafe record is accounted for: a query, or its source scene is not in the pool, or it was removed
    # before mining (how many dedup removes rides on float ties and differs between CPUs), or it got no target
    accounted = ("queries", "source_not_in_pool", "removed_before_mining", "without_targets")
    assert sum(figures[k] for k in accounted) == figures["unsafe_records"] >= 3000, figures
    assert figures["removed_before_mining"] + figures["without_targets"] <= 0.02 * figures["unsafe_records"], figures
    assert figures["queries"] >= 2800
    assert figures["precision_at_1"] >= 0.9, figures
    assert figures["noisy_pairs"] >= 1000
    assert figures["mined_beats_noisy_pair"] >= 0.95, figures


def test_image_mining_beats_noisy_pairs(demo_build):
    figures = mining_figures(demo_build[1], "image")
    assert figures["mined_beats_noisy_pair"] >= 0.95, figures
    assert figures["precision_at_1"] >= 0.5, figures  # images are not taught minimal edits (see toy_pretrain)


def test_audit_command_prints_the_same_figures(demo_build, cli_module):
    path, workdir = demo_build
    code, out, err = cli_module("toy", "audit", str(path))
    assert code == 0, err
    figures = mining_figures(workdir, "text")
    printed = re.search(r"precision@1 ([\d.]+)%", out)
    assert printed and float(printed.group(1)) == pytest.approx(100 * figures["precision_at_1"], abs=0.05)
    assert "illegal activity" in out
