"""The neighbours stage's list-partitioned IVF search (ivf_flat: no process holds the pool) against the exact one."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from saferclip_data.pipeline.workdir import WorkDir

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


def _ivf(base, cli_module, name: str, **settings) -> tuple[dict[str, dict], pq.ParquetFile]:
    work = base / name
    shutil.copytree(base / "exact", work)
    neighbours = {"index": "ivf_flat", "category_max_score": 0.9, **settings}
    data = safety_recipe(work, neighbours=neighbours)
    code, _, err = cli_module("build", str(write_recipe(base / f"{name}.yaml", data)), "--executor", "local",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    return _neighbours(work), pq.read_table(work / "neighbours" / "search-text.parquet")


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
    found, tasks = _ivf(base, cli_module, "few-lists", nlist=8, nprobe=3, task_queries=40, task_pool_rows=60)
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
