"""End-to-end builds: up-to-date logic, invalidation, bad records, empty input, Ray vs local, global stages."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferclip_data.cli.common import recipe_sections
from saferclip_data.pipeline.executors import LocalExecutor
from saferclip_data.pipeline.progress import BuildProgress
from saferclip_data.pipeline.recipe import load_recipe
from saferclip_data.pipeline.runner import Pipeline
from saferclip_data.pipeline.stage import GlobalOutput, Stage
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.stages import REGISTRY

from conftest import recipe_dict, run_cli, write_recipe
from helpers import write_image_manifest, write_tar_shards


def stage_table(workdir, stage: str) -> pa.Table:
    files = sorted((workdir / stage).glob("part-*[0-9].parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def mtimes(workdir, stage: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((workdir / stage).glob("part-*"))}


def test_rerun_is_noop_batch_size_changes_nothing_model_change_reruns_embed(tmp_path, manifest_200, cli):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200))
    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0, err
    source_times, embed_times = mtimes(work, "source"), mtimes(work, "embed")
    assert len(source_times) == 12  # 4 shards x (parquet, rejects, marker)
    first_identity = json.loads((work / "embed" / "_manifest.json").read_text())["metadata"]["model_identity"]

    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0 and "everything up to date: nothing ran" in err
    assert mtimes(work, "source") == source_times and mtimes(work, "embed") == embed_times

    data = recipe_dict(manifest_200, batch_size=7, concurrency=3)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0 and "everything up to date: nothing ran" in err
    assert mtimes(work, "embed") == embed_times

    data["model"]["init_seed"] = 1  # other weights: embed and what follows must re-run, the source must not
    recipe = write_recipe(tmp_path / "r.yaml", data)
    code, out, err = cli("plan", str(recipe), "-w", str(work))
    assert code == 0 and "stale" in out
    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0, err
    assert mtimes(work, "source") == source_times
    assert mtimes(work, "embed") != embed_times
    second_identity = json.loads((work / "embed" / "_manifest.json").read_text())["metadata"]["model_identity"]
    assert second_identity != first_identity
    assert pq.read_schema(work / "embed" / "part-00000.parquet").metadata[b"model_identity"].decode() == second_identity


def test_bad_records_are_rejected_with_reasons_and_counted_by_status(tmp_path, cli):
    manifest = write_image_manifest(tmp_path / "m", 40, corrupt=(5,), empty_caption=(9,))
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest))
    code, _, err = cli("build", str(recipe), "-w", str(work), "--executor", "local", "--no-progress")
    assert code == 0, err
    rejects = {
        (r["key"], r["stage"], r["reason"])
        for r in pa.concat_tables([pq.read_table(f) for f in sorted(work.glob("*/*.rejects.parquet"))]).to_pylist()
    }
    assert rejects == {("rec_00009", "source", "missing caption"), ("rec_00005", "embed", "undecodable image")}
    code, out, _ = cli("status", str(work), "--json")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["source"]["in"] == 40 and rows["source"]["out"] == 39 and rows["source"]["rejected"] == 1
    assert rows["source"]["rejects_by_reason"] == {"missing caption": 1}
    assert rows["embed"]["in"] == 39 and rows["embed"]["out"] == 38
    assert rows["embed"]["rejects_by_reason"] == {"undecodable image": 1}
    assert stage_table(work, "embed").num_rows == 38

    tars = tmp_path / "tars"
    write_tar_shards(tars, 30, 10, truncate_last=True)
    data = recipe_dict(manifest)
    data["source"] = {"kind": "webdataset", "path": str(tars)}
    recipe = write_recipe(tmp_path / "wds.yaml", data)
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w2"), "--executor", "local", "--no-progress")
    assert code == 0, err
    code, out, _ = cli("status", str(tmp_path / "w2"), "--json")
    source = json.loads(out)[0]
    assert source["rejects_by_reason"] == {"truncated tar member": 1}
    assert source["in"] == 30 and source["out"] == 29 and source["shards_done"] == 3


def test_empty_source_fails_fast(tmp_path, cli):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("key,caption,image\n")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest))
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert code == 2
    assert err.strip() == f"error: source: no records in {manifest}"


def test_duplicate_keys_fail_clearly_keeping_shards(tmp_path, cli):
    manifest = write_image_manifest(tmp_path / "m", 4)
    text = manifest.read_text().replace("rec.00001", "rec_00000")  # collides with rec.00000 once dot-free
    manifest.write_text(text)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest))
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert code == 2 and "keys occur more than once" in err and "rec_00000" in err
    assert (tmp_path / "w" / "source" / "part-00000.done.json").is_file()


def _count_keys(root: str, shard_id: str) -> tuple[int, str]:
    keys = WorkDir(root).read_shard("embed", shard_id, ["key"])["key"]
    return len(keys), keys[0].as_py()


class _KeyCount(Stage):
    """A whole-data-set stage for the contract test: a step over every shard as tasks, one table from their
    results."""

    name = "keycount"
    mode = "global"
    inputs = {"embed": ("key",)}

    def run_global(self, ctx):
        shards = ctx.workdir.completed_shards("embed")
        counts = ctx.map(_count_keys, [(str(ctx.workdir.root), s) for s in shards])
        n = sum(c for c, _ in counts)
        ctx.write_table("counts", pa.table({"n": [n], "first": [counts[0][1]]}))
        return GlobalOutput({"in": n, "out": 1})


def test_global_stage_gets_column_access(tmp_path, manifest_200):
    registry = {**REGISTRY, "keycount": _KeyCount}
    data = recipe_dict(manifest_200)
    data["stages"]["keycount"] = {}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data), recipe_sections(), registry)
    pipeline = Pipeline(recipe, registry, WorkDir(tmp_path / "w"))
    with BuildProgress(console=None, enabled=False) as bars:
        outcomes = pipeline.build(LocalExecutor(), bars)
    assert [o.status for o in outcomes] == ["ran", "ran", "ran"]
    counts = pq.read_table(tmp_path / "w" / "keycount" / "counts.parquet").to_pylist()
    assert counts == [{"n": 200, "first": "rec_00000"}]
    with BuildProgress(console=None, enabled=False) as bars:
        assert [o.status for o in pipeline.build(LocalExecutor(), bars)] == ["up to date"] * 3


@pytest.mark.ray
@pytest.mark.slow
def test_ray_and_local_executors_agree(tmp_path, manifest_200):
    data = recipe_dict(manifest_200, concurrency=2)
    data["stages"]["score"] = {"taxonomy": "toy-world", "concurrency": 2}  # its prompts' scores were thread-bound
    recipe = write_recipe(tmp_path / "r.yaml", data)
    results = {}
    for executor in ("local", "ray"):
        work = tmp_path / executor
        proc = run_cli("build", str(recipe), "-w", str(work), "--executor", executor, "--no-progress")
        assert proc.returncode == 0, proc.stderr
        results[executor] = stage_table(work, "embed")
    files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").glob("*/part-*.parquet"))
    assert len(files) == 3 * 4 * 2  # source, embed, score x 4 shards x (output, rejects)
    for rel in files:  # byte-identical whatever the executor (Ray actors run torch on fewer threads)
        assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    local, ray = results["local"], results["ray"]
    assert local.num_rows == 200 and local["key"].to_pylist() == ray["key"].to_pylist()
    for column in ("image_embedding", "text_embedding"):
        a = np.asarray(local[column].to_pylist(), np.float32)
        b = np.asarray(ray[column].to_pylist(), np.float32)
        assert np.abs(a - b).max() < 1e-3
    manifest = json.loads((tmp_path / "ray" / "embed" / "_manifest.json").read_text())
    assert manifest["executor"] == "ray" and manifest["counts"] == {"in": 200, "out": 200, "rejected": 0}


def test_line_progress_prints_start_end_and_a_heartbeat_while_a_step_runs():
    import io
    import time

    from rich.console import Console

    from saferclip_data.pipeline.progress import LineProgress, build_progress

    out = io.StringIO()
    console = Console(file=out, width=80)
    assert isinstance(build_progress(console), LineProgress)  # not a terminal: lines
    with LineProgress(console, every=0.3) as lines:
        lines.begin("embed")
        advance = lines.subtask("pretrain toy CLIP", 4)
        for _ in range(4):
            time.sleep(0.5)
            advance(1)
        lines.start_stage("embed", 100, 0, 2)
        lines.advance(60)
        time.sleep(1.6)  # a long stretch with no progress call: the heartbeat still reports
        lines.shard_done({})
        lines.finish_stage()
    text = out.getvalue()
    assert "embed: starting" in text and "pretrain toy CLIP: starting (4 steps)" in text
    assert "pretrain toy CLIP: done in" in text and "embed: finished in" in text
    assert "embed: 60/100 rec, 60%" in text  # a heartbeat line with the count, share and rate
    assert [s.stage for s in lines.steps] == ["  pretrain toy CLIP"] and lines.steps[0].parent == "embed"
    assert lines.steps[0].seconds >= 1.5
    assert all(line[:2].isdigit() and line[2] == ":" for line in text.splitlines())  # every line timestamped


def test_a_column_the_stage_does_not_declare_stops_the_build_naming_stage_and_column(tmp_path, manifest_200, cli,
                                                                                      monkeypatch):  # fmt: skip
    from saferclip_data.stages.embed import EmbedStage

    real = EmbedStage.compute_batch

    def with_a_surprise(self, prepared):
        result = real(self, prepared)
        result = result() if callable(result) else result
        result.table = result.table.append_column("surprise", pa.array([1] * result.table.num_rows, pa.int64()))
        return result

    monkeypatch.setattr(EmbedStage, "compute_batch", with_a_surprise)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(manifest_200))
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and lines == [
        "error: stage embed wrote column 'surprise', which its declared schema does not have (declared: key, "
        "image_embedding, text_embedding)"
    ], err
    assert not list((tmp_path / "w" / "embed").glob("part-*.parquet"))  # nothing written that breaks the promise
    assert WorkDir(tmp_path / "w").manifest("source")["complete"]  # the stage before keeps its work

    monkeypatch.setattr(EmbedStage, "compute_batch", real)  # declared types are checked too
    monkeypatch.setattr(EmbedStage, "output_schema",
                        lambda self: pa.schema([("key", pa.string()), ("image_embedding", pa.float32()),
                                                ("text_embedding", pa.float32())]))  # fmt: skip
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w2"), "--executor", "local", "--no-progress")
    assert code == 2 and "error: stage embed wrote column 'image_embedding' as fixed_size_list<" in err
    assert "its declared schema says float" in err
