"""The neighbours stage's list-partitioned IVF search (ivf_flat: no process holds the pool) against the exact one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.ivf_recall import choose_probes, needed_probes, recall_at, search_choice

from conftest import write_recipe
from helpers import safety_recipe

COLUMNS = ("text", "image_text")


def _neighbours(work) -> dict[str, dict]:
    table = WorkDir(work).read_stage_columns("neighbours", ["key", *(f"{m}_{c}" for m in COLUMNS for c in (
        "candidates", "similarities", "pair_similarity"))])  # fmt: skip
    return {r["key"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def exact(tmp_path_factory, cli_module):
    base = tmp_path_factory.mktemp("ivf")
    work = base / "exact"
    data = safety_recipe(work, neighbours={"index": "exact", "category_max_score": 0.9})
    code, _, err = cli_module("build", str(write_recipe(base / "exact.yaml", data)), "--executor", "local",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    return base, _neighbours(work)


def _ivf(base, cli_module, name: str, **settings) -> tuple[dict[str, dict], pa.Table | None]:
    work = base / name
    shutil.copytree(base / "exact", work)
    neighbours = {"index": "ivf_flat", "category_max_score": 0.9, **settings}
    data = safety_recipe(work, neighbours=neighbours)
    code, _, err = cli_module("build", str(write_recipe(base / f"{name}.yaml", data)), "--executor", "local",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    searched = WorkDir(work).task_log("neighbours", "search-text")  # empty where the build searched exactly
    return _neighbours(work), pa.Table.from_pylist(searched) if searched else None


def test_probing_every_list_gives_the_exact_search_whatever_the_task_cut(exact, cli_module):
    """nprobe = nlist makes the IVF search exhaustive: the same admissible candidates (own group and category
    exclusions applied) and similarities as the exact search, though the work was cut into many small tasks."""
    base, reference = exact
    found, tasks = _ivf(base, cli_module, "all-lists", nlist=8, nprobe=8, task_queries=40, task_pool_rows=60)
    assert tasks.num_rows >= 3 and max(tasks["pool_rows"].to_pylist()) < sum(1 for _ in reference)
    assert found.keys() == reference.keys()
    for key, row in reference.items():
        for m in COLUMNS:
            assert found[key][f"{m}_candidates"] == row[f"{m}_candidates"], (key, m)
            assert found[key][f"{m}_similarities"] == pytest.approx(row[f"{m}_similarities"], abs=1e-5)
            assert found[key][f"{m}_pair_similarity"] == pytest.approx(row[f"{m}_pair_similarity"], abs=1e-5)


def test_probing_a_few_lists_finds_most_exact_neighbours_with_exact_scores(exact, cli_module):
    base, reference = exact
    found, tasks = _ivf(base, cli_module, "few-lists", nlist=8, nprobe=3, task_queries=40, task_pool_rows=60,
                        min_recall=None)
    hits = total = 0
    for key, row in reference.items():
        for m in COLUMNS:
            if row[f"{m}_candidates"] is None:
                assert found[key][f"{m}_candidates"] is None
                continue
            got = dict(zip(found[key][f"{m}_candidates"], found[key][f"{m}_similarities"]))
            truth = dict(zip(row[f"{m}_candidates"], row[f"{m}_similarities"]))
            hits += len(got.keys() & truth.keys())
            total += len(truth)
            for k in got.keys() & truth.keys():  # a similarity found is always the true cosine
                assert got[k] == pytest.approx(truth[k], abs=1e-5)
    assert total > 1000 and hits / total >= 0.65
    assert tasks["lists"].to_pylist() and max(tasks["lists"].to_pylist()) <= 8


def test_a_probe_count_too_small_for_the_recall_target_is_raised_by_the_build(exact, cli_module):
    """nprobe 1 of 16 lists misses many nearest targets: the build measures recall@1 on sampled queries, probes
    more lists until it reaches min_recall (or searches exactly), records what it measured, and the top-1 targets
    then agree with the exact search's."""
    base, reference = exact
    found, _ = _ivf(base, cli_module, "raised", nlist=16, nprobe=1, task_queries=40, task_pool_rows=60)
    search = json.loads(WorkDir(base / "raised").manifest("neighbours")["metadata"]["search"])
    for m in ("text", "image-text"):
        assert search[m]["index"] == "exact" or search[m]["nprobe"] > 1, search
        assert search[m]["recall_at_1"] >= 0.995 and search[m]["recall_queries"] > 100, search
        assert search[m]["nprobe_configured"] == 1 and search[m]["recall_at_1_configured"] < 0.995, search
    code, _, err = cli_module("report", str(base / "raised"))
    assert code == 0, err
    report = (base / "raised" / "report" / "report.md").read_text()
    assert "nearest-target search (text)" in report and "recall@1 " in report
    unraised, _ = _ivf(base, cli_module, "unraised", nlist=16, nprobe=1, task_queries=40, task_pool_rows=60,
                       min_recall=None)
    for result, floor, ceiling in ((found, 0.99, 1.0), (unraised, 0.0, 0.97)):
        same = total = 0
        for key, row in reference.items():
            for m in COLUMNS:
                if row[f"{m}_candidates"]:
                    total += 1
                    same += (result[key][f"{m}_candidates"] or [None])[0] == row[f"{m}_candidates"][0]
        assert total > 300 and floor <= same / total <= ceiling, (same, total)


def test_the_probe_count_is_the_fewest_lists_that_reach_the_target():
    centroids = np.eye(4, dtype=np.float32) + 0.1 * np.arange(4, dtype=np.float32)[:, None]
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    # three queries homed in list 0: their best rows sit in list 0, in list 3 (tied within 1e-6 with list 2), none
    best = {"sims": np.array([[0.9, 0.5], [0.7, 0.7 - 1e-6], [-np.inf, -np.inf]], np.float32),
            "lists": np.array([[0, 1], [3, 2], [0, 1]])}
    needed = needed_probes(best, np.zeros(3, np.int64), centroids)
    assert needed[0] == 1 and needed[2] == 0 and 2 <= needed[1] <= 4
    assert choose_probes(needed, 1, 4, 0.995) == (needed[1], 1.0)
    assert choose_probes(needed, 1, 4, 0.5) == (1, 0.5)
    assert choose_probes(np.zeros(3, np.int64), 2, 4, 0.995) == (2, 1.0)
    assert recall_at(needed, 1) == 0.5 and recall_at(needed, 4) == 1.0
    chosen = search_choice(needed, 1, 4, 0.995)
    assert chosen["recall_at_1_configured"] == 0.5 and chosen["recall_at_1"] == 1.0
    assert chosen["index"] == ("exact" if needed[1] > 2 else "ivf_flat")  # over half the lists: exact
