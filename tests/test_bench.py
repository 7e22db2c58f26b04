"""The throughput benchmarks compute what they print: counted FLOPs, rates from real runs, ratios."""

from __future__ import annotations

import pytest


def test_bench_train_counts_flops_per_step_and_mfu_against_the_given_peak():
    from saferclip_data.bench.train import bench_train

    lora = bench_train("toy-vit-tiny", "lora", 8, 1, "fp32", "cpu", peak=1.0)
    full = bench_train("toy-vit-tiny", "full", 8, 1, "fp32", "cpu")
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]
    # a full fine-tune also computes every frozen weight's gradient: more FLOPs per sample than LoRA
    assert full["flops_per_sample"] > lora["flops_per_sample"] > 0
    assert lora["samples_per_s"] == pytest.approx(8 / lora["step_seconds"])
    assert lora["mfu"] == pytest.approx(lora["achieved_tflops"] / 1.0)
    assert full["mfu"] is None  # no peak is known for a CPU
    assert lora["reference"] == "as trained"  # fp32 step: the reference keeps the model's weights
    bf16_reference = bench_train("toy-vit-tiny", "lora", 8, 1, "fp32", "cpu", reference_precision="bf16")
    assert bf16_reference["reference"] == "bfloat16" and bf16_reference["flops_per_sample"] > 0


@pytest.mark.slow
def test_bench_embed_runs_the_real_stage_and_reports_its_ratio_to_the_encoder():
    from saferclip_data.bench.embed import EmbedRun, run_bench

    rows = run_bench("toy-vit-tiny", 96, 64, ["local"], EmbedRun(32, 1, 1.0, 0, "cpu", "fp32"))
    names = [r[0] for r in rows]
    assert names[0] == "image encoder only" and names[-1] == "embed stage, local"
    assert [n.split(":")[0] for n in names[1:-1]] == ["  per batch"] * 4
    assert "text tower" in names[1] and "tokenise" in names[2]
    ceiling = float(rows[0][2].replace(",", ""))
    assert ceiling > 0
    span, whole = (float(x) for x in rows[-1][3].replace("(", "").replace(")", "").split())
    assert 0 < span < whole  # shards only, without the worker's model loading
    for row in rows[1:]:  # each rate against the encoder's
        rate = float(row[2].replace(",", ""))
        assert rate > 0 and float(row[4]) == pytest.approx(rate / ceiling, rel=0.01, abs=0.01)


@pytest.mark.slow
def test_bench_embed_makes_the_shards_and_the_source_stage_once_per_size(tmp_path, monkeypatch):
    """The suite's embed parts share synthetic shards and the (untimed) source stage of one size."""
    import os

    from saferclip_data.bench import embed as bench_embed

    made, linked = [], []
    make, build = bench_embed.synthetic_shards, bench_embed.end_to_end

    def counting_make(*args, **kwargs):
        made.append(args[1:3])
        return make(*args, **kwargs)

    def spying_build(shards, work, *args):
        result = build(shards, work, *args)
        linked.append(min(os.stat(p).st_nlink for p in (work / "w" / "source").glob("*.parquet")))
        return result

    monkeypatch.setattr(bench_embed, "synthetic_shards", counting_make)
    monkeypatch.setattr(bench_embed, "end_to_end", spying_build)
    run = bench_embed.EmbedRun(32, 1, 1.0, 0, "cpu", "fp32")
    for _ in range(2):
        rows = bench_embed.run_bench("toy-vit-tiny", 64, 64, ["local"], run, scratch=tmp_path)
        assert float(rows[-1][2].replace(",", "")) > 0
    assert made == [(64, 64)]  # the shards once
    assert linked == [1, 2]  # the second build reads the first one's source output (hard links), not its own


def test_bench_knn_times_each_backend_against_matmul_and_the_naive_loop_and_checks_exactness():
    from saferclip_data.bench.knn import run_knn_bench

    rows = run_knn_bench(3000, 200, 32, 5, ["torch", "nope"], repeats=1, sample=50)
    naive, torch_row, missing = rows
    assert naive.backend == "torch naive loop" and torch_row.backend == "torch (saferclip)"
    for r in (naive, torch_row):
        assert r.seconds > 0 and r.matmul_seconds > 0 and r.naive_seconds == naive.seconds
        assert r.tflops == pytest.approx(2 * 200 * 3000 * 32 / r.seconds / 1e12)
        assert r.exact_rows == 1.0 and r.recall == 1.0  # against the numpy fp32 reference
    assert missing.seconds is None and "unavailable" in missing.note


def test_agreement_counts_rows_in_order_and_pairs_found():
    import numpy as np

    from saferclip_data.bench.knn import agreement

    reference = np.array([[1, 2, 3], [4, 5, 6]])
    assert agreement(reference.copy(), reference) == (1.0, 1.0)
    assert agreement(np.array([[2, 1, 3], [4, 5, 9]]), reference) == (0.0, pytest.approx((1 + 2 / 3) / 2))


def test_the_cli_and_the_stages_import_without_polars_or_faiss():
    """A minimal GPU host may have neither: building source + embed there must not import them;
    the report stage and the faiss backend import them where they are used."""
    import subprocess
    import sys

    code = ("import sys, saferclip_data.cli.main, saferclip_data.stages, saferclip_data.training.trainer; "
            "print(sorted(m for m in ('polars', 'faiss', 'matplotlib') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_bench_suite_writes_every_part_and_keeps_going_past_a_failure(tmp_path, monkeypatch):
    import json

    from saferclip_data.bench import suite as bench_suite

    def broken(*args, **kwargs):
        raise RuntimeError("no trainer today")

    monkeypatch.setattr("saferclip_data.bench.train.bench_train", broken)
    results = bench_suite.run_suite(tmp_path, quick=True, log=lambda line: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    lora = "train toy-vit-tiny lora batch 8"
    assert set(saved["errors"]) == {lora, f"{lora}, reference bf16"} and "no trainer today" in saved["errors"][lora]
    figures = saved["figures"]
    assert figures["knn exact rows"] == 1.0 and figures["knn effective TFLOP/s"] > 0
    assert figures["embed toy-vit-tiny local / encoder"] == pytest.approx(
        figures["embed toy-vit-tiny local img/s"] / figures["embed toy-vit-tiny encoder img/s"]
    )
    assert all(v["pass"] is None for v in saved["verdicts"].values())  # an H200's targets are not judged on a CPU
    assert "FAILED" in (tmp_path / "results.md").read_text() and results.figures == figures


def test_the_suite_judges_full_fine_tuning_by_its_best_batch_and_leaves_comparison_rows_out(tmp_path, monkeypatch):
    from saferclip_data.bench import suite as bench_suite

    mfu = {(48, "auto", None): 0.31, (128, "auto", None): 0.33, (128, "auto", "default"): 0.36, (48, "fp32", None): 0.4}

    def stand_in(arch, finetune, batch_size, steps, precision, device, peak, reference, compile_mode):
        return {"samples_per_s": 100.0, "mfu": mfu[batch_size, reference, compile_mode]}

    monkeypatch.setattr("saferclip_data.bench.train.bench_train", stand_in)
    results = bench_suite.SuiteResults(tmp_path, {"cuda": "13.0"})
    for spec in [s for s in bench_suite.FULL if s["kind"] == "train" and s["finetune"] == "full"]:
        bench_suite._train(results, spec, bench_suite.part_name(spec))
    assert results.figures["train ViT-L-14 full batch 48 MFU"] == 0.31
    assert results.figures["train ViT-L-14 full batch 128 compiled default MFU"] == 0.36  # a setting: a candidate
    assert results.figures["train ViT-L-14 full batch 48, reference fp32 MFU"] == 0.40  # reported, not judged
    verdict = results.verdicts()["train ViT-L-14 full MFU"]
    assert verdict["value"] == 0.36 and verdict["pass"] is True


def test_every_target_of_the_full_suite_gets_its_figure_from_the_parts_that_measure_it(tmp_path, monkeypatch):
    """The full suite only runs on a GPU; with stand-ins for the measurements, each target's figure name must
    match what its part records (a target left 'not measured' would waste the GPU session)."""
    from saferclip_data.bench import knn as bench_knn
    from saferclip_data.bench import suite as bench_suite
    from saferclip_data.bench.knn import KnnRow

    def embed_rows(arch, images, image_px, executors, run, scratch=None):
        rows = [("image encoder only", "cuda", "1,000", "-", "1.00", "")]
        for executor in executors:
            ratio = "0.95" if executor == "ray" and "local" in executors else ""
            rows.append((f"embed stage, {executor}", "1 worker(s)", "950", "1.0 (2.0)", "0.95", ratio))
        return rows

    def knn_rows(*args):
        return [KnnRow("torch naive loop", "cuda", 4.0, 150.0, 1.0, 4.0, 1.0, 1.0),
                KnnRow("torch (saferclip)", "cuda", 1.0, 600.0, 1.0, 4.0, 1.0, 1.0)]  # fmt: skip

    monkeypatch.setattr("saferclip_data.bench.embed.run_bench", embed_rows)
    monkeypatch.setattr(bench_knn, "run_knn_bench", knn_rows)
    monkeypatch.setattr(
        "saferclip_data.bench.train.bench_train", lambda *a: {"samples_per_s": 9.0, "mfu": 0.4}
    )
    stand_in_loader = lambda *a, **k: (99.0, "cuda (nvJPEG)", 5000.0)  # noqa: E731
    monkeypatch.setattr("saferclip_data.bench.train.loader_rate", stand_in_loader)
    monkeypatch.setattr(bench_suite, "machine_facts", lambda: {"cuda": "13.0", "device": "stand-in"})
    results = bench_suite.run_suite(tmp_path, log=lambda line: None)
    assert results.errors == {}
    verdicts = results.verdicts()
    assert [name for name, v in verdicts.items() if v["value"] is None] == []
    assert verdicts["knn x naive"]["value"] == 4.0 and verdicts["embed ViT-L-14 ray / local"]["value"] == 0.95
    assert verdicts["embed ViT-B-32 local img/s"]["pass"] is False and verdicts["train ViT-L-14 full MFU"]["pass"]
    figures = results.figures  # each loader against the trainer rows of its own model
    assert figures["train ViT-B-32 lora batch 256 loader / step"] == pytest.approx(99.0 / 9.0)
    assert figures["train ViT-L-14 full batch 48 loader / step"] == pytest.approx(99.0 / 9.0)
    assert figures["loader ViT-B-32 batch 256 samples/s"] == 99.0


def test_suite_parts_run_alone_add_to_the_results_already_there_and_redo_a_failed_part(tmp_path, monkeypatch):
    import json

    from saferclip_data.bench import suite as bench_suite

    names = [bench_suite.part_name(s) for s in bench_suite.selected_parts(["embed ViT-B-32"])]
    assert names == ["embed ViT-B-32"]  # a whole name selects that part alone
    assert len(bench_suite.selected_parts(["ViT-B-32"])) == 5  # anything else: every part containing it
    with pytest.raises(ValueError, match="'nope' matches no part"):
        bench_suite.selected_parts(["knn", "nope"])

    def broken(*args, **kwargs):
        raise RuntimeError("no loader today")

    with monkeypatch.context() as patched:
        patched.setattr("saferclip_data.bench.train.loader_rate", broken)
        bench_suite.run_suite(tmp_path, quick=True, log=lambda line: None, parts=["knn", "loader"])
    first = json.loads((tmp_path / "results.json").read_text())
    assert "knn effective TFLOP/s" in first["figures"] and set(first["errors"]) == {"loader toy-vit-tiny batch 8"}

    bench_suite.run_suite(tmp_path, quick=True, log=lambda line: None, parts=["loader"])
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["errors"] == {}  # redone, and it worked this time
    assert second["figures"]["knn effective TFLOP/s"] == first["figures"]["knn effective TFLOP/s"]  # kept
    assert second["figures"]["loader toy-vit-tiny batch 8 samples/s"] > 0
    assert second["figures"]["loader toy-vit-tiny batch 8 stream read by one worker of 8 /s"] > 0
    assert second["tables"]["loader toy-vit-tiny batch 8"][0]["workers"] == 0  # none on a CPU (auto)

    monkeypatch.setattr(bench_suite, "machine_facts", lambda: {"device": "another machine"})
    bench_suite.run_suite(tmp_path, quick=True, log=lambda line: None, parts=["loader"])
    third = json.loads((tmp_path / "results.json").read_text())
    assert "knn effective TFLOP/s" not in third["figures"]  # figures from another device are not mixed in


def test_same_output_tells_identical_from_reordered_from_different(tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saferclip_data.bench.same_output import compare_builds

    table = pa.table({"key": ["a", "b", "c"], "score": pa.array([0.1, 0.2, 0.3], pa.float32()),
                      "targets": [["x"], ["y", "z"], None]})  # fmt: skip
    for name in ("one", "two", "three"):
        (tmp_path / name / "mine").mkdir(parents=True)
    pq.write_table(table, tmp_path / "one" / "mine" / "part-00000.parquet")
    noisy = table.take([2, 0, 1]).set_column(1, "score", pa.array([0.3, 0.1 + 1e-8, 0.2], pa.float32()))
    pq.write_table(noisy, tmp_path / "two" / "mine" / "part-00000.parquet")
    changed = table.set_column(2, "targets", pa.array([["x"], ["z", "y"], None]))
    pq.write_table(changed, tmp_path / "three" / "mine" / "part-00000.parquet")
    (same,) = compare_builds(tmp_path / "one", tmp_path / "one")
    assert same["identical"] == 1 and not same["differ"]
    (reordered,) = compare_builds(tmp_path / "one", tmp_path / "two")
    assert reordered["same_records"] == 1 and not reordered["differ"] and reordered["max_float_diff"] < 1e-6
    (different,) = compare_builds(tmp_path / "one", tmp_path / "three")
    assert different["differ"] == ["mine/part-00000.parquet: column targets differs"]
    for other, expected in (("two", 0), ("three", 1)):  # the command's exit code says whether anything differs
        code, _, _ = cli("bench", "same-output", str(tmp_path / "one"), str(tmp_path / other))
        assert code == expected
