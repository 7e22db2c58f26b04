"""The trainer's data stream (schedule, seeded order, shares per process and worker), adapters (LoRA through
peft on both towers, or full), mixed text-only batches, frozen reference, checkpoints and exact resume after
SIGKILL, two-process DDP, bf16 autocast, zero-shot on image folders, and the train/eval commands."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections import Counter
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from saferclip_data.pipeline.workdir import WorkDir

from helpers import write_tar


def _quad_urls(built) -> list[str]:
    return sorted(str(p) for p in (built / "shards" / "quad").glob("quad-*.tar"))


def _stream(built, epoch: int, seed: int = 0, workers: int = 0) -> list[dict]:
    from saferclip_data.training.data import quad_pipeline

    def tokenizer(texts):
        return torch.tensor([[len(t), t.count(" ")] for t in texts])

    def preprocess(image):
        return torch.as_tensor(np.asarray(image.resize((16, 16)), np.float32)).permute(2, 0, 1)

    pipeline = quad_pipeline(_quad_urls(built), preprocess, tokenizer, 16, epoch=epoch, batch_size=7, seed=seed)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)
    return list(loader)


def test_progressive_schedule_admits_easy_then_medium_then_all(built):
    from saferclip_data.training.data import buckets_for_epoch

    assert buckets_for_epoch(0) == {"easy"} and buckets_for_epoch(1) == {"easy", "medium"}
    assert buckets_for_epoch(5) == {"easy", "medium", "hard"}
    stats = json.loads((built / "shards" / "quad" / "stats.json").read_text())
    supply = Counter()
    for info in stats.values():
        supply.update(info["difficulty"])
    for epoch, admitted in ((0, {"easy"}), (1, {"easy", "medium"}), (2, {"easy", "medium", "hard"})):
        batches = _stream(built, epoch)
        seen = [d for b in batches for d in b["difficulty"]]
        assert set(seen) <= admitted and len(seen) == sum(supply[d] for d in admitted)
        assert all(len(b["key"]) <= 7 for b in batches)


def test_stream_order_is_seeded_per_epoch_and_workers_see_each_sample_once(built):
    keys = [k for b in _stream(built, epoch=2) for k in b["key"]]
    assert keys == [k for b in _stream(built, epoch=2) for k in b["key"]]  # same seed and epoch: same order
    assert keys != [k for b in _stream(built, epoch=3) for k in b["key"]]  # next epoch: reshuffled
    assert sorted(keys) == sorted(k for b in _stream(built, epoch=2, workers=2) for k in b["key"])


def test_the_fast_tar_reader_gives_webdatasets_samples_and_leaves_odd_tars_to_it(built, tmp_path):
    """data.tar_samples reads the trainer's tars from a memory map instead of through tarfile (which capped each
    DataLoader worker at ~2.4k samples/s): samples and order must be webdataset's own, whatever the tar holds."""
    import tarfile

    import webdataset as wds

    from saferclip_data.training import data

    long_key = "k" * 120
    plain = write_tar(tmp_path / "plain.tar", [("a.TXT", b"1"), ("a.json", b"{}"), ("dir/", b""), ("dir/b.txt", b"2"),
                                          ("__meta__", b"x"), (f"{long_key}.txt", b"3"), ("ü.txt", b"4"),
                                          ("c.txt", b"5" * 1000), ("c.npy", b"")])  # fmt: skip
    ustar = write_tar(tmp_path / "ustar.tar", [("p/" * 60 + "d.txt", b"6"), ("e.txt", b"7")], tarfile.USTAR_FORMAT)
    linked = write_tar(tmp_path / "linked.tar", [("f.txt", b"8"), ("f.txt@link", b"")])
    gnu = write_tar(tmp_path / "gnu.tar", [(f"{long_key}.txt", b"9")], tarfile.GNU_FORMAT)
    plain, ustar, linked, gnu = (str(p) for p in (plain, ustar, linked, gnu))
    urls = [*_quad_urls(built), plain, ustar, linked, gnu]
    for url in urls[:-2]:
        assert data._plain_tar_index(url)  # these take the fast path
    for url in urls[-2:]:
        with pytest.raises(data.NotPlainTar):  # these go to webdataset
            data._plain_tar_index(url)

    def samples(stage) -> list[dict]:
        return list(wds.DataPipeline(wds.SimpleShardList(urls), stage))

    ours = samples(data.tar_samples)
    assert ours == samples(wds.tarfile_to_samples())
    deferred = samples(partial(data.tar_samples, defer_over=1))
    assert any(isinstance(v, data.TarMember) for s in deferred for v in s.values())
    assert [data.read_members(s) for s in deferred] == ours  # read later, the same bytes
    keys = [s["__key__"] for s in ours]
    assert {"a", "dir/b", long_key, "ü", "c", "p/" * 60 + "d", "e", "f"} <= set(keys)
    assert next(s for s in ours if s["__key__"] == "a")["txt"] == b"1"  # suffixes lower-cased as webdataset does

    whole = open(plain, "rb").read()
    name, start, size = data._plain_tar_index(plain)[-1]
    truncated = tmp_path / "truncated.tar"
    for cut in range(100, start + size, 97):  # anywhere before the last member's data ends: a clear error
        truncated.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="truncated.tar: truncated tar"):
            list(data.tar_samples([{"url": str(truncated)}]))


def test_a_rank_reads_the_images_and_embeddings_of_only_the_samples_it_keeps(built, monkeypatch):
    from saferclip_data.training import data

    reads = []
    read = data.TarMember.read
    monkeypatch.setattr(data.TarMember, "read", lambda member: reads.append(member) or read(member))
    everything = [k for b in _stream(built, epoch=2) for k in b["key"]]
    reads_of_all = len(reads)
    reads.clear()
    mine = []
    for batch in data.quad_pipeline(_quad_urls(built), None, lambda texts: torch.zeros(len(texts), 4), 16, epoch=2,
                                    batch_size=7, rank=1, world_size=4):  # fmt: skip
        mine += batch["key"]
    assert mine == everything[1::4]  # the same share of the same stream as before
    assert reads_of_all >= 2 * len(everything)  # at least the two images of every sample
    members = {s["__key__"]: [v for v in s.values() if isinstance(v, data.TarMember)]
               for s in data.tar_samples([{"url": u} for u in _quad_urls(built)], defer_over=1024)}  # fmt: skip
    assert sorted(reads, key=str) == sorted((m for key in mine for m in members[key]), key=str)  # the kept ones


def test_with_a_tar_split_each_rank_reads_only_its_tars_and_ranks_stay_in_step(built):
    """split: tars (for many GPUs): rank r reads every world-th tar of the epoch's order and nothing else; every
    rank takes as many samples as the rank whose tars admit the fewest, so DDP steps stay in step."""
    from saferclip_data.training import data
    from saferclip_data.training.trainer import TrainConfig, samples_per_rank

    urls, shard_dir = _quad_urls(built), built / "shards" / "quad"
    tar_of = {s["__key__"]: s["__url__"] for s in data.tar_samples([{"url": u} for u in urls])}
    config = TrainConfig(split="tars", seed=3)
    for epoch in (0, 2):
        admitted = data.buckets_for_epoch(epoch, config.schedule)
        per_rank = samples_per_rank(shard_dir, urls, epoch, config, 2)
        shares = []
        for rank in (0, 1):
            mine = data.epoch_shard_order(urls, 3, epoch, rank, 2, "tars")
            batches = list(data.quad_pipeline(urls, None, lambda texts: torch.zeros(len(texts), 4), 16, epoch=epoch,
                                              seed=3, batch_size=5, rank=rank, world_size=2, limit=per_rank,
                                              split="tars"))  # fmt: skip
            keys = [k for b in batches for k in b["key"]]
            assert {tar_of[k] for k in keys} <= set(mine)  # only its own tars
            assert {d for batch in batches for d in batch["difficulty"]} <= admitted
            shares.append(keys)
        assert len(shares[0]) == len(shares[1]) == per_rank > 0 and not set(shares[0]) & set(shares[1])
        whole = samples_per_rank(shard_dir, urls, epoch, config.model_copy(update={"split": "samples"}), 1)
        assert 2 * per_rank <= whole  # the larger rank's surplus waits for a later epoch
    assert data.epoch_shard_order(urls, 3, 0, 0, 1, "tars") == data.epoch_shard_order(urls, 3, 0)  # one process
    with pytest.raises(ValueError, match="at least one tar per process"):
        samples_per_rank(shard_dir, urls, 0, config, len(urls) + 1)
    with pytest.raises(ValueError, match="split: 'files'"):
        data.epoch_shard_order(urls, 0, 0, split="files")


def test_streamed_targets_are_the_frozen_top1_embeddings(built):
    wd = WorkDir(built)
    embed = {r["key"]: r for r in wd.read_stage_columns("embed", ["key", "text_embedding"]).to_pylist()}
    mine = {r["key"]: r["text_targets"] for r in wd.read_stage_columns("mine", ["key", "text_targets"]).to_pylist()}
    batch = _stream(built, epoch=2)[0]
    for key, target in zip(batch["key"], batch["target_text"]):
        frozen = np.asarray(embed[mine[key][0]]["text_embedding"], np.float32)
        assert np.allclose(target.numpy(), frozen / np.linalg.norm(frozen), atol=2e-3)
    assert batch["unsafe_image"].shape[1:] == (3, 16, 16) and batch["has_image"].all()


@pytest.mark.parametrize("method", ["saferclip", "safeclip"])
def test_reference_encoders_stay_unchanged_while_the_model_trains(built, method):
    from saferclip_data.models.clip import load_clip
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.reference import TrainedWithReference

    torch.manual_seed(0)
    clip = load_clip("toy-resnet-tiny", None, init_seed=0)
    pipeline = quad_pipeline(_quad_urls(built), clip.preprocess, clip.tokenizer, clip.image_size, epoch=2,
                             batch_size=16)  # fmt: skip
    batches = list(pipeline)[:3]
    pair = TrainedWithReference(clip.model)
    probe = batches[0]
    with torch.no_grad():
        ref_before = [
            pair.reference.encode_image(probe["unsafe_image"]),
            pair.reference.encode_text(probe["unsafe_text"]),
        ]
        model_before = pair.model.encode_text(probe["unsafe_text"]).clone()
    _, first = pair.loss(batches[0], method)  # before any step the model is its reference: nothing to preserve
    assert first["preserve_image" if method == "saferclip" else "vision_safe"] < 1e-5
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=1e-3)
    for batch in batches:
        loss, parts = pair.loss(batch, method)
        assert torch.isfinite(loss) and len(parts) >= 6
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not pair.reference.training and not any(p.requires_grad for p in pair.reference.parameters())
    assert all(p.grad is None for p in pair.reference.parameters())
    with torch.no_grad():
        assert torch.equal(pair.reference.encode_image(probe["unsafe_image"]), ref_before[0])
        assert torch.equal(pair.reference.encode_text(probe["unsafe_text"]), ref_before[1])
        assert not torch.allclose(pair.model.encode_text(probe["unsafe_text"]), model_before)


TRAIN_SCRIPT = """
import sys
from pathlib import Path
from saferclip_data.models.clip import load_clip
from saferclip_data.training.trainer import TrainConfig, train
clip = load_clip("toy-resnet-tiny", None, init_seed=0)
config = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=3, seed=1)
train(clip, Path(sys.argv[1]), Path(sys.argv[2]), config)
"""


def _steps(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_steps_and_data_order(built, tmp_path):
    import os
    import signal
    import time

    from saferclip_data.models.clip import load_clip
    from saferclip_data.training.trainer import TrainConfig, train

    shard_dir = built / "shards" / "quad"
    config = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=3, seed=1)
    straight = load_clip("toy-resnet-tiny", None, init_seed=0)
    result = train(straight, shard_dir, tmp_path / "straight", config)
    reference = _steps(tmp_path / "straight")
    assert result["step"] == len(reference) >= 12 and not result["stopped"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(shard_dir), str(out)])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "last.pt").is_file() and (out / "log.jsonl").is_file() and len(_steps(out)) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_steps(out))
    assert 7 <= killed_at < len(reference)

    resumed = load_clip("toy-resnet-tiny", None, init_seed=0)
    result = train(resumed, shard_dir, out, config)
    steps = _steps(out)
    assert result["step"] == len(reference) and [s["step"] for s in steps] == list(range(1, len(reference) + 1))
    assert [s["keys"] for s in steps] == [s["keys"] for s in reference]  # same data, same order
    assert [s["epoch"] for s in steps] == [s["epoch"] for s in reference]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_train_command_streams_the_build_into_the_trainer(built, cli_module):
    recipe = built.parent / "r.yaml"
    code, out, err = cli_module("train", str(recipe), "--method", "safeclip", "--max-steps", "2")
    assert code == 0, err
    log = _steps(built / "train" / "safeclip")
    assert [s["step"] for s in log] == [1, 2] and "unsafe_vision_to_tref" in log[0]["terms"]
    assert "stopped at --max-steps after 2 steps" in out
    code, _, err = cli_module("train", str(recipe), "--method", "nope")
    assert code == 2 and "--method" in err
    code, _, err = cli_module("train", str(recipe), "--compile", "fast")
    assert code == 2 and "--compile" in err and "max-autotune" in err


def test_eval_command_compares_base_and_trained_models(built, cli_module):
    recipe = built.parent / "r.yaml"
    code, _, err = cli_module("train", str(recipe), "--method", "saferclip", "--max-steps", "2")
    assert code == 0, err
    code, out, err = cli_module("eval", str(recipe), "--checkpoint", str(built / "train" / "saferclip" / "last.pt"))
    assert code == 0, err
    results = json.loads((built / "eval" / "eval.json").read_text())
    assert list(results) == ["base", "saferclip"]
    quads = pq.read_table(built / "benchmark" / "benchmark.parquet").num_rows
    wd = WorkDir(built)
    role = dict(zip(*wd.read_stage_columns("mine", ["key", "role"]).to_pydict().values()))
    roles_of_group: dict[str, set] = {}
    for key, split, group in zip(*wd.read_stage_columns("source", ["key", "split", "group"]).to_pydict().values()):
        if split == "test" and key in role:  # the shards' exclude_splits: the held-out split
            roles_of_group.setdefault(group, set()).add(role[key])
    held = sum(roles == {"safe", "unsafe"} for roles in roles_of_group.values())
    assert held > 5
    for r in results.values():
        assert r["quadruplets"] == quads and len(r["retrieval"]) == 8
        assert all(0 <= v <= 1 for d in r["retrieval"].values() for v in d.values())
        assert "toy object" in r["zero_shot"] and r["heldout_quadruplets"] == held and len(r["heldout_retrieval"]) == 8
    assert results["base"]["weight_l2_to_original"] == 0 and results["saferclip"]["weight_l2_to_original"] > 0
    assert "| saferclip |" in out


def _tiny(arch: str = "toy-vit-tiny"):
    from saferclip_data.models.clip import load_clip

    return load_clip(arch, None, init_seed=0)


def test_lora_adapts_every_attention_block_of_both_towers_and_merges_exactly():
    from saferclip_data.training.adapters import AdapterSettings, attach, lora_targets, merged

    clip = _tiny()
    attention = [n for n, m in clip.model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert any(n.startswith("visual.") for n in attention) and any(not n.startswith("visual.") for n in attention)
    targets = lora_targets(clip.model, ["image", "text"])
    assert set(attention) <= set(targets)
    assert not any(t.endswith("out_proj") for t in targets)  # left to the attention block's own adapter
    images, texts = torch.randn(2, 3, clip.image_size, clip.image_size), clip.tokenizer(["a red cube", "a dog"])
    wrapper = attach(clip.model, AdapterSettings("lora", ("image", "text"), lora_rank=4, lora_alpha=8))
    trainable = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero: make the adapters do something
    (clip.model.encode_image(images).sum() + clip.model.encode_text(texts).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    with torch.no_grad():
        adapted = clip.model.encode_image(images), clip.model.encode_text(texts)
        with wrapper.disable_adapter():
            plain = clip.model.encode_image(images)
        assert (adapted[0] - plain).abs().max() > 1e-3
        plain_model = merged(wrapper)
        assert type(plain_model).__name__ == "CLIP" and not any("lora" in k for k in plain_model.state_dict())
        assert torch.allclose(plain_model.encode_image(images), adapted[0], atol=1e-5)
        assert torch.allclose(plain_model.encode_text(texts), adapted[1], atol=1e-5)


def test_convolutional_toy_tower_gets_adapters_and_towers_option_limits_training():
    from saferclip_data.training.adapters import AdapterSettings, attach, lora_targets

    clip = _tiny("toy-resnet-tiny")
    assert any(isinstance(clip.model.get_submodule(t), torch.nn.Conv2d) for t in lora_targets(clip.model, ["image"]))
    wrapper = attach(clip.model, AdapterSettings("lora", ("text",)))
    names = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert names and not any(".visual." in n for n in names)
    full = _tiny("toy-resnet-tiny")
    attach(full.model, AdapterSettings("full", ("image",)))
    trains = {n.startswith("visual.") for n, p in full.model.named_parameters() if p.requires_grad}
    assert trains == {True}
    with pytest.raises(ValueError, match="towers"):
        attach(_tiny("toy-resnet-tiny").model, AdapterSettings("full", ("audio",)))


def test_text_only_rows_train_the_text_terms_and_image_rows_the_image_terms(built):
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.losses import saferclip_loss
    from saferclip_data.training.reference import TrainedWithReference

    clip = _tiny("toy-resnet-tiny")
    batch = next(iter(quad_pipeline(_quad_urls(built), clip.preprocess, clip.tokenizer, clip.image_size, epoch=2,
                                    batch_size=12)))  # fmt: skip
    pair = TrainedWithReference(clip.model)
    full = pair.embeddings(batch)
    mixed_batch = {**batch, "has_image": torch.tensor([i % 3 != 0 for i in range(12)])}
    mixed = pair.embeddings(mixed_batch)
    rows = mixed_batch["has_image"]
    assert mixed.unsafe_image.shape[0] == int(rows.sum()) and mixed.unsafe_text.shape[0] == 12
    _, parts_mixed = saferclip_loss(mixed)
    _, parts_full = saferclip_loss(full)
    for term in ("proximity_text", "preserve_text"):  # text terms: every row, whatever the images
        assert float(parts_mixed[term]) == pytest.approx(float(parts_full[term]), rel=1e-5)
    own = torch.nn.functional.cosine_similarity(full.unsafe_image[rows], full.target_image[rows]).detach()
    assert parts_mixed["proximity_image"] == pytest.approx(float((1 - own).mean()), rel=1e-5)  # image rows only
    assert float(parts_mixed["proximity_image"]) != pytest.approx(float(parts_full["proximity_image"]), rel=1e-4)

    text_only = {**batch, "has_image": torch.zeros(12, dtype=torch.bool)}
    loss, parts = pair.loss(text_only)
    assert "relative_image" not in parts and "preserve_cross" not in parts
    loss.backward()
    grads = {n.startswith("visual."): p.grad is not None for n, p in pair.model.named_parameters()}
    assert grads == {True: False, False: True}  # the text tower only


def test_every_rank_and_worker_gets_an_equal_disjoint_share():
    from saferclip_data.training.data import _share

    samples = [{"__key__": f"k{i}"} for i in range(23)]
    shares = [[s["__key__"] for s in _share(iter(samples), r, 3, limit=23 // 3)] for r in range(3)]
    assert [len(s) for s in shares] == [7, 7, 7]
    flat = [k for s in shares for k in s]
    assert len(set(flat)) == 21 and set(flat) <= {s["__key__"] for s in samples}


def test_lora_checkpoint_holds_only_adapters_and_loads_back_merged(built, tmp_path):
    from saferclip_data.training.trainer import TrainConfig, load_checkpoint, train

    shard_dir = built / "shards" / "quad"
    config = TrainConfig(epochs=1, batch_size=8, lr=5e-3, warmup_steps=1, lora_rank=4, schedule=[["easy", "medium",
                         "hard"]])  # fmt: skip
    clip = _tiny("toy-resnet-tiny")
    result = train(clip, shard_dir, tmp_path / "out", config)
    assert not result["stopped"]
    state = torch.load(tmp_path / "out" / "last.pt", weights_only=False)
    assert state["trainable"] and all("lora_" in n for n in state["trainable"])
    assert state["base"] == clip.identity
    exported = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    loaded = load_checkpoint(_tiny("toy-resnet-tiny"), tmp_path / "out" / "last.pt")
    for name, value in loaded.model.state_dict().items():
        assert torch.allclose(value, exported[name], atol=1e-6), name
    base = _tiny("toy-resnet-tiny").model.state_dict()
    assert any(not torch.allclose(base[n], exported[n]) for n in base if base[n].is_floating_point())
    other = _tiny("toy-vit-tiny")
    with pytest.raises(ValueError, match="trained from"):
        load_checkpoint(other, tmp_path / "out" / "last.pt")
    # the split among ranks sets the data order and the epoch's size: a resume must keep it
    with pytest.raises(ValueError, match="trained with split: samples"):
        train(_tiny("toy-resnet-tiny"), shard_dir, tmp_path / "out", config.model_copy(update={"split": "tars"}))


def test_a_bf16_reference_runs_outside_autocast_and_matches_the_model_it_copies(built):
    """On a GPU the frozen reference holds bf16 weights (auto): it must still be the trained model's start, so
    the preservation terms begin near zero, and it must stay frozen."""
    from saferclip_data.models.clip import load_clip
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.device import reference_dtype
    from saferclip_data.training.reference import TrainedWithReference

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert reference_dtype(cuda, "auto", "auto") is torch.bfloat16 and reference_dtype(cpu, "auto", "auto") is None
    assert reference_dtype(cuda, "auto", "fp32") is None and reference_dtype(cpu, "bf16", "auto") is torch.bfloat16
    with pytest.raises(ValueError, match="reference_precision"):
        reference_dtype(cpu, "auto", "fp16")

    clip = load_clip("toy-vit-tiny", None, init_seed=0)
    batch = next(iter(quad_pipeline(_quad_urls(built), clip.preprocess, clip.tokenizer, clip.image_size, epoch=2,
                                    batch_size=16)))  # fmt: skip
    pair = TrainedWithReference(clip.model, reference_dtype=torch.bfloat16)
    assert {p.dtype for p in pair.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pair.model.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = pair.loss(batch)
        e = pair.embeddings(batch)
    for trained, frozen in ((e.safe_image, e.ref_safe_image), (e.safe_text, e.ref_safe_text)):
        cosine = torch.nn.functional.cosine_similarity(trained.float(), frozen.float(), dim=-1)
        assert cosine.min() > 0.999  # bf16 weights vs autocast over fp32: the same model to bf16 rounding
    assert parts["preserve_image"] < 1e-3 and parts["preserve_text"] < 1e-3
    loss.backward()
    assert all(p.grad is None for p in pair.reference.parameters())
    assert any(p.grad is not None for p in pair.model.parameters())


def test_bf16_autocast_step_trains_and_auto_means_fp32_on_cpu(built, tmp_path):
    from saferclip_data.training.device import uses_bf16
    from saferclip_data.training.trainer import TrainConfig, train

    assert not uses_bf16(torch.device("cpu"), "auto") and uses_bf16(torch.device("cuda"), "auto")
    assert not uses_bf16(torch.device("cuda"), "fp32") and uses_bf16(torch.device("cpu"), "bf16")
    config = TrainConfig(epochs=1, batch_size=8, precision="bf16", finetune="full", warmup_steps=1)
    result = train(_tiny("toy-resnet-tiny"), built / "shards" / "quad", tmp_path / "bf16", config, stop_after=2)
    steps = _steps(tmp_path / "bf16")
    assert result["step"] == 2 and all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)


@pytest.mark.slow
def test_compiled_towers_train_as_the_eager_ones_and_checkpoint_the_same_parameters(built, tmp_path):
    """training.compile (CPU inductor here) with LoRA: the reference's towers compile, the trained ones (with
    LoRA attention layers torch cannot trace) stay eager; the logged losses and the trained adapters equal an
    eager run's, and the checkpoint names the same parameters."""
    from saferclip_data.training.adapters import AdapterSettings
    from saferclip_data.training.reference import TrainedWithReference

    pair = TrainedWithReference(_tiny().model, AdapterSettings(towers=("image",)))
    assert pair.compile("default") == {"trained": ["transformer"], "reference": ["visual", "transformer"]}
    from saferclip_data.training.trainer import TrainConfig, train

    shard_dir = built / "shards" / "quad"
    config = TrainConfig(epochs=1, batch_size=8, lr=5e-3, warmup_steps=1, lora_rank=4, schedule=[["easy", "medium",
                         "hard"]])  # fmt: skip
    runs = {}
    for mode in (None, "default"):
        torch.manual_seed(0)  # the same LoRA init for both
        out = tmp_path / str(mode)
        train(_tiny(), shard_dir, out, config.model_copy(update={"compile": mode}), stop_after=3)
        runs[mode] = (_steps(out), torch.load(out / "last.pt", weights_only=False)["trainable"])
    (eager_log, eager_state), (compiled_log, compiled_state) = runs[None], runs["default"]
    assert [s["keys"] for s in compiled_log] == [s["keys"] for s in eager_log]
    assert [s["loss"] for s in compiled_log] == pytest.approx([s["loss"] for s in eager_log], rel=1e-4)
    assert list(compiled_state) == list(eager_state) and all("lora_" in n for n in compiled_state)
    for name, value in eager_state.items():
        # Adam turns float-noise-sized gradient differences on near-zero gradients into steps of up to lr (5e-3):
        # a tolerance of 4 % of one step tells that noise (measured up to 3.6e-5) from a real divergence
        assert torch.allclose(compiled_state[name], value, atol=2e-4), name
    with pytest.raises(ValueError, match="compile: 'fast'"):
        train(_tiny(), shard_dir, tmp_path / "bad", config.model_copy(update={"compile": "fast"}), stop_after=1)


@pytest.mark.slow
def test_a_compiled_full_fine_tune_step_gives_the_eager_loss_and_gradients(built):
    from saferclip_data.training.adapters import AdapterSettings
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.reference import TrainedWithReference

    clip = _tiny()
    batch = next(iter(quad_pipeline(_quad_urls(built), clip.preprocess, clip.tokenizer, clip.image_size, epoch=2,
                                    batch_size=16)))  # fmt: skip
    results = []
    for compiled in (False, True):
        pair = TrainedWithReference(copy.deepcopy(clip.model), AdapterSettings(finetune="full"))
        names = list(pair.wrapper.state_dict())
        if compiled:
            assert pair.compile("default") == {
                "trained": ["visual", "transformer"],
                "reference": ["visual", "transformer"],
            }
            assert list(pair.wrapper.state_dict()) == names  # nn.Module.compile keeps the parameter names
        torch._dynamo.utils.counters.clear()
        loss, _ = pair.loss(batch)
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled  # the towers did compile
        loss.backward()
        grads = {n: p.grad for n, p in pair.model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 50
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-3, atol=1e-5), name


DDP_SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
from saferclip_data.models.clip import load_clip, state_dict_digest
from saferclip_data.training.trainer import TrainConfig, train
clip = load_clip("toy-resnet-tiny", None, init_seed=0)
config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_steps=1, lora_rank=4, schedule=[["easy", "hard"]],
                     split=sys.argv[3])
out = Path(sys.argv[2])
train(clip, Path(sys.argv[1]), out, config, stop_after=3)
(out / f"rank{dist.get_rank()}.digest").write_text(state_dict_digest(clip.model))
"""


@pytest.mark.slow
@pytest.mark.parametrize("split", ["samples", "tars"])
def test_two_process_ddp_keeps_replicas_identical(built, tmp_path, split):
    """Both ways of sharing the epoch between ranks keep them in step (a rank short of batches would hang)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    port = {"samples": "29533", "tars": "29534"}[split]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), str(built / "shards" / "quad"), str(out), split]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = {p.name: p.read_text() for p in out.glob("rank*.digest")}
    assert len(digests) == 2 and len(set(digests.values())) == 1  # gradients were all-reduced
    single = _tiny("toy-resnet-tiny")
    from saferclip_data.models.clip import state_dict_digest

    assert state_dict_digest(single.model) != next(iter(digests.values()))  # and they did train
    from saferclip_data.training.trainer import TrainConfig, samples_per_rank

    config = TrainConfig(schedule=[["easy", "hard"]], split=split)
    per_rank = samples_per_rank(built / "shards" / "quad", _quad_urls(built), 0, config, 2)
    expected = min(3, math.ceil(per_rank / 4))  # the script stops after 3; a tar split may have fewer samples
    steps = _steps(out)
    assert [s["step"] for s in steps] == list(range(1, expected + 1)) and expected >= 2
    assert [len(s["keys"]) for s in steps] == [min(4, per_rank - 4 * i) for i in range(expected)]


def test_zero_shot_on_an_image_folder_matches_the_direct_computation(tmp_path):
    import random

    from saferclip_data.models.clip import load_recipe_clip
    from saferclip_data.toyworld.world import TRAIN_PLACES, sample_scene
    from saferclip_data.training.evaluate import zero_shot_folder

    clip = load_recipe_clip("toy-resnet-tiny", "toy-world", init_seed=0)
    rng = random.Random(7)
    places = sorted(TRAIN_PLACES)
    truth = []
    for i in range(120):
        scene = sample_scene(rng)
        folder = tmp_path / "places" / scene.place.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        scene.render(clip.image_size, False).save(folder / f"{i:04d}.png")
        truth.append(scene.place)
    templates = ["a photo of the {}", "a picture at the {}"]
    result = zero_shot_folder(clip, tmp_path / "places", templates)
    present = sorted(set(truth))
    assert result["images"] == 120 and result["classes"] == len(present) <= len(places)
    assert result["accuracy"] >= 0.9  # the toy CLIP knows its places (99.6 % in `toy pretrain`)
    (tmp_path / "places" / "classnames.txt").write_text("\n".join(present[1:] + present[:1]))
    shuffled = zero_shot_folder(clip, tmp_path / "places", templates)
    assert shuffled["accuracy"] < 0.5  # names from the file, not the folders: the wrong names score badly


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_workers_train_through_the_train_command(built, tmp_path):
    from conftest import run_cli

    out = tmp_path / "ray"
    args = ["train", str(built.parent / "r.yaml"), "--ray-workers", "2", "--out", str(out), "--max-steps", "2"]
    proc = run_cli(*args, env={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at --max-steps after 2 steps" in proc.stdout
    steps = _steps(out)
    assert [s["step"] for s in steps] == [1, 2] and all(len(set(s["keys"])) == len(s["keys"]) for s in steps)
    from saferclip_data.training.trainer import TrainConfig, resolve_split, samples_per_rank

    shard_dir = built / "shards" / "quad"
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    split = resolve_split("auto", len(urls), 2)  # the default: each rank its own tars where there are enough
    per_rank = samples_per_rank(shard_dir, urls, 0, TrainConfig(schedule=[["easy"]], split=split), 2)
    assert len(steps[0]["keys"]) == min(32, per_rank)  # rank 0's share of epoch 1 (easy only), one batch
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 2 and any(float(v.abs().sum()) > 0 for n, v in state["trainable"].items() if "lora_B" in n)


def test_step_log_writes_every_n_steps_and_on_flush(tmp_path):
    """Loss values stay tensors until the log writes them (a GPU step never waits for a number); every entry
    still reaches log.jsonl, with the values it was given."""
    from saferclip_data.training.trainer import StepLog

    log = StepLog(tmp_path / "log.jsonl", every=3)
    for step in range(1, 5):
        terms = {"a": torch.tensor(step * 0.5)} if step != 2 else {"a": torch.tensor(1.0), "b": torch.tensor(-2.0)}
        log.add({"step": step}, torch.tensor(float(step)), terms)
        written = _steps(tmp_path) if (tmp_path / "log.jsonl").stat().st_size else []
        assert len(written) == (3 if step >= 3 else 0)
    assert log.last_loss == 3.0
    log.close()
    lines = _steps(tmp_path)
    assert [line["loss"] for line in lines] == [1.0, 2.0, 3.0, 4.0]
    assert lines[1]["terms"] == {"a": 1.0, "b": -2.0} and lines[3]["terms"] == {"a": 2.0}


@pytest.mark.gpu
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_training_step_on_cuda_never_waits_for_the_device(finetune):
    """torch's sync debug mode turns any host synchronisation inside the step (a .item(), a mask-indexing, a
    device-to-host copy) into an error: the step as the trainer runs it has none."""
    from saferclip_data.bench.train import synthetic_batch
    from saferclip_data.training.adapters import AdapterSettings
    from saferclip_data.training.device import autocast_for, reference_dtype
    from saferclip_data.training.reference import TrainedWithReference
    from saferclip_data.training.trainer import StepLog

    device = torch.device("cuda")
    clip = _tiny()
    frozen = reference_dtype(device, "auto", "auto")  # as the trainer: a bf16 reference outside autocast
    pair = TrainedWithReference(clip.model.to(device), AdapterSettings(finetune=finetune), frozen)
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=1e-4, fused=True)
    batch = synthetic_batch(clip, 16, device)
    log = StepLog(None, every=10)
    for step in range(3):  # the first step is allowed its lazy initialisations
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with autocast_for(device, "auto"):
                loss, parts = pair.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.add({"step": step}, loss, parts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_images_decoded_on_the_device_train_like_pil_decoded_ones(built, tmp_path):
    """decode: device (the GPU path, here on the CPU): the loader hands over encoded bytes, the trainer decodes
    them with the model's preprocessing; same pixels to rounding, same losses to ~1e-3, same data order."""
    from saferclip_data.models.decode import DeviceDecoder
    from saferclip_data.training.data import quad_pipeline
    from saferclip_data.training.trainer import TrainConfig, train

    clip = _tiny("toy-resnet-tiny")
    kwargs = {"epoch": 2, "batch_size": 6}
    pil = next(iter(quad_pipeline(_quad_urls(built), clip.preprocess, clip.tokenizer, clip.image_size, **kwargs)))
    raw = next(iter(quad_pipeline(_quad_urls(built), None, clip.tokenizer, clip.image_size, **kwargs)))
    assert isinstance(raw["unsafe_image"], list) and isinstance(raw["unsafe_image"][0], bytes)
    assert raw["key"] == pil["key"] and torch.equal(raw["has_image"], pil["has_image"])
    decoded = DeviceDecoder(clip.preprocess, clip.image_size, torch.device("cpu"))(raw)
    for name in ("unsafe_image", "safe_image"):
        assert decoded[name].shape == pil[name].shape
        assert (decoded[name] - pil[name]).abs().mean() < 0.02  # normalised units: a fraction of a grey level

    losses = {}
    for decode in ("cpu", "device"):
        config = TrainConfig(epochs=1, batch_size=8, warmup_steps=1, decode=decode, seed=3)
        train(_tiny("toy-resnet-tiny"), built / "shards" / "quad", tmp_path / decode, config, stop_after=2)
        losses[decode] = _steps(tmp_path / decode)
    assert [s["keys"] for s in losses["cpu"]] == [s["keys"] for s in losses["device"]]
    for a, b in zip(losses["cpu"], losses["device"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2, abs=1e-3)


def test_the_tar_split_is_the_default_wherever_there_are_more_tars_than_ranks():
    from saferclip_data.training.trainer import TrainConfig, resolve_split

    assert TrainConfig().split == "auto"
    assert resolve_split("auto", tars=16, world=8) == "tars"
    assert resolve_split("auto", tars=8, world=8) == "samples"  # a rank per tar would leave ranks idle at the end
    assert resolve_split("auto", tars=16, world=1) == "samples"  # one process reads the same either way
    assert resolve_split("samples", tars=64, world=8) == "samples"  # an explicit choice stands


def test_training_metrics_reach_tensorboard_and_wandb_offline(built, tmp_path, monkeypatch):
    """training.log_dir: TensorBoard's own reader finds, for every logged step, the loss, each loss term and the
    learning rate, with log.jsonl's values; training.wandb writes an offline run without any network."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from saferclip_data.training.trainer import TrainConfig, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    board = tmp_path / "tb"
    config = TrainConfig(epochs=1, batch_size=8, warmup_steps=1, log_every=1, log_dir=str(board), wandb="saferclip-t")
    train(_tiny("toy-resnet-tiny"), built / "shards" / "quad", tmp_path / "run", config, stop_after=3)
    logged = _steps(tmp_path / "run")
    assert len(logged) == 3
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    terms = set(logged[0]["terms"])
    assert terms and {"loss", "lr", *(f"loss/{t}" for t in terms)} <= tags
    for tag in ("loss", "lr", *(f"loss/{t}" for t in terms)):
        assert [e.step for e in events.Scalars(tag)] == [s["step"] for s in logged], tag
    for event, step in zip(events.Scalars("loss"), logged):
        assert abs(event.value - step["loss"]) < 1e-5
    assert list((tmp_path / "run" / "wandb").rglob("*.wandb")), "an offline wandb run file"
