"""A source's own safe/unsafe labels decide the roles by default: a recipe written from the docs cannot silently
take roles from the zero-shot scores instead (and so invert them on a pool the model reads poorly)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages.report_data import label_agreement

from conftest import write_recipe
from embedding_layouts import planted_pool, write_clip_retrieval

DIM = 128


def _docs_recipe(folder, work, score: dict) -> dict:
    """What docs/recipes.md shows for a LAION pool: punsafe threshold on the source, the score stage untouched."""
    return {
        "name": "laion-docs",
        "workdir": str(work),
        "source": {"kind": "embeddings", "path": str(folder), "shard_size": 200,
                   "embeddings": {"punsafe_threshold": 0.5}},
        "model": {"arch": "toy-vit-tiny", "pretrained": None},
        "stages": {"embed": {}, "score": score, "filter": {}},
    }  # fmt: skip


def _roles(work) -> tuple[dict, dict]:
    wd = WorkDir(work)
    labels = {r["key"]: r["label"] for r in wd.read_stage_columns("source", ["key", "label"]).to_pylist()}
    kept = {r["key"]: r for r in wd.read_stage_columns("filter", ["key", "role", "role_source"]).to_pylist()}
    return labels, kept


def test_punsafe_labels_decide_the_roles_when_the_recipe_says_nothing(tmp_path, cli_module):
    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(600, DIM), parts=2)
    recipe = write_recipe(tmp_path / "r.yaml", _docs_recipe(folder, tmp_path / "work", {}))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    labels, kept = _roles(tmp_path / "work")
    assert set(labels.values()) == {"safe", "unsafe"} and len(kept) >= 500
    assert all(r["role"] == labels[k] and r["role_source"] == "label" for k, r in kept.items())
    agreement = {row["label"]: row for row in label_agreement(tmp_path / "work")}
    assert set(agreement) == {"safe", "unsafe"}
    assert sum(row["records"] for row in agreement.values()) == len(labels)
    assert all(0.0 <= row["agreement"] <= 1.0 for row in agreement.values())


def test_role_column_null_takes_the_roles_from_the_scores(tmp_path, cli_module):
    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(400, DIM), parts=1)
    recipe = write_recipe(tmp_path / "r.yaml", _docs_recipe(folder, tmp_path / "work", {"role_column": None}))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    _, kept = _roles(tmp_path / "work")
    assert kept and all(r["role_source"] == "scores" for r in kept.values())


def test_a_label_that_is_neither_safe_nor_unsafe_stops_the_build_naming_role_column(tmp_path, cli_module):
    folder = write_clip_retrieval(tmp_path / "laion", planted_pool(200, DIM), parts=1)
    meta = folder / "metadata" / "metadata_0.parquet"
    table = pq.read_table(meta).drop_columns(["punsafe"])
    labels = ["cats" if i % 2 else "safe" for i in range(table.num_rows)]
    pq.write_table(table.append_column("label", pa.array(labels)), meta)
    recipe = write_recipe(tmp_path / "r.yaml", _docs_recipe(folder, tmp_path / "work", {}))
    code, _, err = cli_module("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 2 and "stages.score.role_column" in err and "'cats'" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert WorkDir(tmp_path / "work").manifest("embed")["complete"]  # what was done stays done
