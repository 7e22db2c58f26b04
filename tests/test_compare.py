"""The comparison command (resumable, mean ± sd over seeds) and Safe-CLIP's retrieval protocol in eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import CLI


def test_safeclip_protocol_by_hand_and_equal_to_the_retrieval_table_where_both_measure_it():
    from saferclip_data.training.evaluate import retrieval_table, safeclip_protocol

    # three quadruplets in 2-d: safe images and captions on the axes, unsafe ones rotated towards the next item
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -0.1]])
    v_star = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])  # unsafe image i looks like safe image i+1
    t_star = torch.tensor([[0.9, 0.2], [0.2, 0.9], [-0.9, -0.2]])
    protocol = safeclip_protocol(v, t, v_star, t_star)
    assert set(protocol) == {"T->V", "T->V*", "T*->V", "T*->V*", "V->T", "V->T*", "V*->T", "V*->T*"}
    assert all(set(r) == {"R@1", "R@5", "R@10", "R@20"} for r in protocol.values())
    # by hand: safe captions find their own safe image (R@1 = 1); unsafe images are the next quadruplet's
    # picture, so from a caption their own one is never first: R@1 0, and within 3 items always found
    assert protocol["T->V"]["R@1"] == 1.0 and protocol["T*->V"]["R@1"] == 1.0
    assert protocol["T->V*"]["R@1"] == 0.0 and protocol["T->V*"]["R@5"] == 1.0
    assert protocol["V*->T"]["R@1"] == 0.0
    table = retrieval_table(v, t, v_star, t_star)
    for pairing, direction in (("T->V", "T->V safe"), ("T*->V", "T*->V safe"), ("V->T", "V->T safe"),
                               ("V*->T", "V*->T safe")):  # fmt: skip
        for k in ("R@1", "R@5", "R@10"):
            assert protocol[pairing][k] == table[direction][k], (pairing, k)


@pytest.mark.slow
def test_compare_killed_mid_run_redoes_only_the_unfinished_runs(built, tmp_path):
    out = tmp_path / "compare"
    args = [*CLI, "compare", str(built.parent / "r.yaml"), "--seeds", "2", "--method", "saferclip",
            "--finetune", "lora", "--epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    runs = [out / "runs" / f"saferclip-lora-seed{s}" / "eval.json" for s in range(2)]
    deadline = time.monotonic() + 600
    while not runs[0].is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs[0].is_file(), first.communicate()[1][-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished_before = [r for r in runs if r.is_file()]
    assert len(finished_before) < 2, "every run finished before the kill: nothing was interrupted"
    stamps = {r: r.stat().st_mtime_ns for r in finished_before}

    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    for r in finished_before:
        assert r.stat().st_mtime_ns == stamps[r]  # not redone
        assert f"{r.parent.name}: done before" in second.stdout
    assert all(r.is_file() for r in runs)
    assert second.stdout.count(": training") == 2 - len(finished_before)
    payload = json.loads((out / "results.json").read_text())
    assert list(payload["rows"]) == ["base", "SaFeR-CLIP, lora"]
    row = payload["rows"]["SaFeR-CLIP, lora"]
    assert row["benchmark T*->V R@1"]["runs"] == 2 and row["benchmark T*->V R@1"]["sd"] >= 0
    assert len(payload["points"]) == 2 and all(0 <= p["unsafe_to_safe_r1"] <= 1 for p in payload["points"])
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| SaFeR-CLIP, lora |" in (out / "results.md").read_text()
    # a third call redoes nothing
    third = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and third.stdout.count("done before") == 2 and ": training" not in third.stdout


def test_compare_refuses_a_bad_seed_count_in_one_line(built):
    proc = subprocess.run([*CLI, "compare", str(built.parent / "r.yaml"), "--seeds", "0"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 2 and "--seeds" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
