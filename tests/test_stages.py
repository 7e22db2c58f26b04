"""Stage cores without Ray: source reading and checks, embedding, alignment, the keep-or-reject invariant."""

from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pytest

from saferclip_data.pipeline.stage import BatchResult, ShardSpec, Stage
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.pipeline.worker import ShardWorker, StageJob
from saferclip_data.stages import source_tables
from saferclip_data.stages.embed import EmbedConfig, EmbedStage, ModelConfig
from saferclip_data.stages.source import SourceConfig, SourceStage

from helpers import scene, write_image_manifest, write_tar_shards


def _source(**kw) -> SourceStage:
    return SourceStage(SourceConfig(**kw), {})


def test_manifest_source_keys_groups_and_rejects(tmp_path):
    manifest = write_image_manifest(tmp_path, 6, empty_caption=(2,))
    (tmp_path / "images" / "img00004.jpg").unlink()
    stage = _source(kind="manifest", path=str(manifest), shard_size=4)
    specs = stage.plan_shards(WorkDir(tmp_path / "w"))
    assert [s.payload["rows"] for s in specs] == [4, 2]
    raw = pa.concat_tables([stage.read_shard(s, None) for s in specs])
    result = stage.process_batch(raw)
    keys = result.table["key"].to_pylist()
    assert keys == ["rec_00000", "rec_00001", "rec_00003", "rec_00005"]  # dots replaced, order kept
    assert all("." not in k for k in keys)
    assert result.table["group"].to_pylist() == ["g00000", "g00000", "g00001", "g00002"]
    assert result.table["image"][0].as_py() == (tmp_path / "images" / "img00000.jpg").read_bytes()
    reasons = {r.key: r.reason for r in result.rejects}
    assert reasons == {"rec_00002": "missing caption", "rec_00004": "image not readable"}
    assert "img00004.jpg" in next(r.error for r in result.rejects if r.key == "rec_00004")


def test_a_manifest_worker_reads_only_its_shard_rows_written_when_planning(tmp_path, monkeypatch):
    """The driver writes each shard's manifest rows once; a worker (a fresh stage instance) reads those and never
    the whole manifest, and gets the same records."""
    manifest = write_image_manifest(tmp_path, 7, fmt="parquet")
    wd = WorkDir(tmp_path / "w")
    specs = _source(kind="manifest", path=str(manifest), shard_size=3).plan_shards(wd)
    assert [s.payload["input"] for s in specs] == [f"_input/part-0000{i}.parquet" for i in range(3)]
    reads: list[str] = []
    real = source_tables.read_part
    monkeypatch.setattr(source_tables, "read_part", lambda part: reads.append(part.path) or real(part))
    worker = _source(kind="manifest", path=str(manifest), shard_size=3)
    from_slices = pa.concat_tables([worker.read_shard(s, wd) for s in specs])
    assert reads == []  # the worker never loaded the manifest
    from_manifest = pa.concat_tables([worker.read_shard(s, None) for s in specs])
    assert reads == [str(manifest)] and from_slices.equals(from_manifest)
    assert from_slices["key"].to_pylist() == [f"rec_{i:05d}" for i in range(7)]


def test_text_only_records_allowed_when_configured(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"caption": "a red circle"}\n{"caption": "a blue square", "image": null}\n')
    stage = _source(kind="manifest", path=str(path), require_image=False)
    result = stage.process_batch(stage.read_shard(stage.plan_shards(None)[0], None))
    assert result.table.num_rows == 2 and not result.rejects
    assert result.table["key"].to_pylist() == ["m_000000000", "m_000000001"]
    assert result.table["image"].null_count == 2
    strict = _source(kind="manifest", path=str(path))
    rejected = strict.process_batch(strict.read_shard(strict.plan_shards(None)[0], None))
    assert [r.reason for r in rejected.rejects] == ["missing image", "missing image"]


def test_webdataset_truncated_member_is_rejected_with_key(tmp_path):
    tars = write_tar_shards(tmp_path, 10, 5, truncate_last=True)
    stage = _source(kind="webdataset", path=str(tmp_path / "shard-{000..001}.tar"))
    specs = stage.plan_shards(None)
    assert [s.payload["file"] for s in specs] == [str(t) for t in tars]
    first = stage.process_batch(stage.read_shard(specs[0], None))
    assert first.table.num_rows == 5 and not first.rejects
    assert first.table["group"].to_pylist()[:2] == ["g00000", "g00000"]
    second = stage.process_batch(stage.read_shard(specs[1], None))
    assert len(second.rejects) == 1
    bad = second.rejects[0]
    assert (bad.key, bad.reason) == ("s00009", "truncated tar member")
    assert "s00009.jpg" in bad.error
    # everything before the cut survives
    assert second.table["key"].to_pylist() == ["s00005", "s00006", "s00007", "s00008"]


def test_image_folder_with_sidecar_captions(tmp_path):
    for i, sub in enumerate(["cats", "dogs", "dogs"]):
        (tmp_path / sub).mkdir(exist_ok=True)
        data, caption = scene(i)
        (tmp_path / sub / f"p.{i}.jpg").write_bytes(data)
        (tmp_path / sub / f"p.{i}.txt").write_text(caption)
    stage = _source(kind="image_folder", path=str(tmp_path))
    result = stage.process_batch(stage.read_shard(stage.plan_shards(None)[0], None))
    assert result.table["key"].to_pylist() == ["cats_p_0", "dogs_p_1", "dogs_p_2"]
    assert result.table["label"].to_pylist() == ["cats", "dogs", "dogs"]
    assert result.table["caption"][0].as_py() == scene(0)[1]


@pytest.fixture(scope="module")
def embed_stage():
    stage = EmbedStage(EmbedConfig(device="cpu"), {"model": ModelConfig(arch="toy-vit-tiny")})
    stage.setup()
    return stage


def test_embed_batch_normalised_float16_with_nulls_and_rejects(embed_stage):
    good, caption = scene(1)
    png, _ = scene(2, fmt="PNG")
    batch = pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "caption": [caption, None, "only text", "broken"],
            "image": pa.array([good, png, None, good[:200]], pa.binary()),
        }
    )
    result = embed_stage.process_batch(batch)
    assert [(r.key, r.reason) for r in result.rejects] == [("d", "undecodable image")]
    table = result.table
    assert table["key"].to_pylist() == ["a", "b", "c"]
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 128)
    img = table["image_embedding"]
    txt = table["text_embedding"]
    assert [v is None for v in img.to_pylist()] == [False, False, True]
    assert [v is None for v in txt.to_pylist()] == [False, True, False]
    vec = np.asarray(img[0].as_py(), np.float32)
    assert abs(np.linalg.norm(vec) - 1) < 2e-3
    # the same image alone gives the same vector: rows do not leak into each other
    alone = embed_stage.process_batch(batch.slice(0, 1)).table["image_embedding"][0].as_py()
    np.testing.assert_allclose(np.asarray(alone, np.float32), vec, atol=1e-3)
    assert embed_stage.output_metadata()["model_identity"].startswith("toy-vit-tiny@sha256:")


def test_read_aligned_joins_on_key_in_first_input_order(tmp_path):
    wd = WorkDir(tmp_path)
    empty = pa.table(
        {
            "key": pa.array([], pa.string()),
            "stage": pa.array([], pa.string()),
            "reason": pa.array([], pa.string()),
            "error": pa.array([], pa.string()),
        }
    )
    wd.write_shard("a", "part-00000", pa.table({"key": ["x", "y", "z"], "v": [1, 2, 3]}), empty, {}, {})
    wd.write_shard("b", "part-00000", pa.table({"key": ["z", "x"], "w": [30, 10]}), empty, {}, {})
    aligned = wd.read_aligned("part-00000", {"b": ("key", "w"), "a": ("v",)})
    assert aligned.to_pydict() == {"key": ["z", "x"], "w": [30, 10], "v": [3, 1]}


class _DroppingStage(Stage):
    name = "dropping"
    inputs = {"a": ("key",)}

    def process_batch(self, batch):
        return BatchResult(batch.slice(0, batch.num_rows - 1), [])


def test_a_stage_that_loses_records_fails_loudly(tmp_path):
    wd = WorkDir(tmp_path)
    wd.write_shard(
        "a", "part-00000", pa.table({"key": ["x", "y"]}), pa.table({"key": pa.array([], pa.string())}), {}, {}
    )
    worker = ShardWorker(StageJob(_DroppingStage, _DroppingStage.Config(), {}, str(tmp_path)))
    with pytest.raises(RuntimeError, match="every record must be kept or rejected"):
        worker.run_shard(ShardSpec("part-00000"))
    assert not wd.shard_done("dropping", "part-00000")


def test_manifest_with_urls_fetches_over_loopback_http(tmp_path):
    import functools
    import http.server
    import threading

    write_image_manifest(tmp_path, 3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        path = tmp_path / "urls.jsonl"
        path.write_text(
            f'{{"key": "u0", "caption": "a", "image": "{base}/images/img00000.jpg"}}\n'
            f'{{"key": "u1", "caption": "b", "image": "{base}/images/missing.jpg"}}\n'
        )
        stage = _source(kind="manifest", path=str(path), url_timeout=5)
        result = stage.process_batch(stage.read_shard(stage.plan_shards(None)[0], None))
    finally:
        server.shutdown()
        server.server_close()
    assert result.table["key"].to_pylist() == ["u0"]
    assert result.table["image"][0].as_py() == (tmp_path / "images" / "img00000.jpg").read_bytes()
    assert [(r.key, r.reason) for r in result.rejects] == [("u1", "image not readable")]
    assert "404" in result.rejects[0].error


@pytest.mark.gpu
def test_gpu_decode_and_bf16_embed_match_cpu(embed_stage):
    """nvJPEG decode + GPU resize + bf16 towers agree with the PIL + fp32 CPU path."""
    gpu = EmbedStage(EmbedConfig(device="cuda"), {"model": ModelConfig(arch="toy-vit-tiny")})
    gpu.setup()
    assert gpu.device == "cuda"
    images = [scene(i)[0] for i in range(16)]
    batch = pa.table(
        {
            "key": [f"k{i}" for i in range(16)],
            "caption": [scene(i)[1] for i in range(16)],
            "image": pa.array(images, pa.binary()),
        }
    )
    cpu_out, gpu_out = embed_stage.process_batch(batch).table, gpu.process_batch(batch).table
    for column in ("image_embedding", "text_embedding"):
        a = np.asarray(cpu_out[column].to_pylist(), np.float32)
        b = np.asarray(gpu_out[column].to_pylist(), np.float32)
        cosine = (a * b).sum(1)
        assert cosine.min() > 0.98, (column, cosine.min())


def _noise_jpeg(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.linspace(0, 255, width)[None, :, None] * rng.random(3) + rng.normal(0, 20, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@pytest.mark.gpu
def test_gpu_pipelined_batches_match_batch_by_batch():
    """Side-stream decoding, two batches in flight and asynchronous copies back give the vectors each batch
    gets alone (a missed stream wait or event would hand back unfinished or reused memory)."""
    from saferclip_data.pipeline.worker import batch_results

    gpu = EmbedStage(EmbedConfig(device="cuda"), {"model": ModelConfig(arch="toy-vit-tiny")})
    gpu.setup()
    batches = [
        pa.table(
            {
                "key": [f"k{b}-{i}" for i in range(8)],
                "caption": [scene(b * 8 + i)[1] for i in range(8)],
                "image": pa.array([scene(b * 8 + i)[0] for i in range(8)], pa.binary()),
            }
        )
        for b in range(5)
    ]
    alone = [gpu.process_batch(b).table for b in batches]
    pipelined = [r.table for _, r in batch_results(gpu, batches)]
    for a, b in zip(alone, pipelined):
        assert a["key"].to_pylist() == b["key"].to_pylist()
        for column in ("image_embedding", "text_embedding"):
            x, y = (np.asarray(t[column].to_pylist(), np.float32) for t in (a, b))
            np.testing.assert_allclose(x, y, atol=2e-3)


def test_tensor_decoder_reproduces_the_models_own_preprocessing(embed_stage):
    """The GPU path's arithmetic (batched decode, size groups, resize, crop, normalise), run on the CPU: the
    same pixels as PIL to within a quarter of a grey level on average, the same rejects, the same vectors."""

    from saferclip_data.models.decode import decode_pil, decode_tensors, normalization

    sizes = [(64, 64), (100, 80), (80, 100), (100, 80), (37, 53), (300, 200)]
    blobs = [_noise_jpeg(w, h, i) for i, (w, h) in enumerate(sizes)] + [_noise_jpeg(50, 70, 9, "PNG")]
    blobs.append(blobs[0][:200])  # truncated
    clip = embed_stage.clip
    mean, std = normalization(clip.preprocess)
    reference, ok_ref, failed_ref = decode_pil(blobs, clip.preprocess)
    pixels, ok, failed = decode_tensors(blobs, clip.image_size, mean, std, "cpu")
    assert ok == ok_ref == list(range(7)) and [i for i, _ in failed] == [i for i, _ in failed_ref] == [7]
    assert "truncated" in failed[0][1].lower() and ".cpp" not in failed[0][1]
    difference = ((pixels - reference).abs() * std).flatten(1)  # in 0..1 intensity units
    assert difference.mean(1).max() < 0.002 and difference.max() < 0.1
    assert difference[0].max() == 0  # 64 px already: no resize, identical pixels

    tensor_stage = EmbedStage(EmbedConfig(device="cpu", decoder="tensor"), {"model": ModelConfig(arch="toy-vit-tiny")})
    tensor_stage.setup()
    batch = pa.table({"key": [f"k{i}" for i in range(8)], "caption": ["a photo"] * 8, "image": blobs})
    a, b = embed_stage.process_batch(batch), tensor_stage.process_batch(batch)
    assert [r.key for r in a.rejects] == [r.key for r in b.rejects] == ["k7"]
    va = np.asarray(a.table["image_embedding"].to_pylist(), np.float32)
    vb = np.asarray(b.table["image_embedding"].to_pylist(), np.float32)
    assert (va * vb).sum(1).min() > 0.999


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_byte_views_are_the_rows_bytes_over_one_copy_per_chunk(kind):
    from saferclip_data.models.decode import byte_views

    rows = [b"\xff\xd8\xffabc", None, b"", b"xyz", b"0123456789"]
    whole = pa.array(rows, kind)
    column = pa.chunked_array([whole.slice(1, 3), whole.slice(0, 1), whole.slice(4)])  # offsets inside chunks
    views = byte_views(column)
    want = [rows[1], rows[2], rows[3], rows[0], rows[4]]
    assert [None if v is None else bytes(v) for v in views] == [None, None, b"xyz", rows[0], rows[4]]
    assert views[2].flags.writeable  # the tensor decoders need writable memory
    assert [bytes(v[:3]) for v in views if v is not None] == [w[:3] for w in want if w]
    assert byte_views(pa.chunked_array([], kind)) == []
    with pytest.raises(TypeError, match="binary column"):
        byte_views(pa.array(["text"]))


@pytest.mark.slow
def test_a_compiled_image_tower_gives_the_eager_vectors_for_full_and_short_batches(embed_stage):
    """torch.compile (inductor; a C++ compiler on the CPU): short batches are padded to the batch size, so they
    reuse the one compiled graph and still give each image its own vector."""
    compiled = EmbedStage(EmbedConfig(device="cpu", batch_size=8, compile="default"),
                          {"model": ModelConfig(arch="toy-vit-tiny")})  # fmt: skip
    compiled.setup()
    for rows in (8, 3):
        batch = pa.table({"key": [f"k{i}" for i in range(rows)], "caption": [scene(i)[1] for i in range(rows)],
                          "image": pa.array([scene(i)[0] for i in range(rows)], pa.binary())})  # fmt: skip
        want, got = embed_stage.process_batch(batch).table, compiled.process_batch(batch).table
        assert got.num_rows == rows
        for column in ("image_embedding", "text_embedding"):
            x, y = (np.asarray(t[column].to_pylist(), np.float32) for t in (want, got))
            np.testing.assert_allclose(x, y, atol=2e-3)
    assert EmbedConfig(compile="default").fingerprint_dict()["compile"] == "default"
    assert "compile" not in EmbedConfig().fingerprint_dict()  # unset: existing work dirs stay up to date


def test_tensor_decoder_is_refused_for_preprocessing_it_cannot_reproduce():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from saferclip_data.models.decode import tensor_path_mismatch

    assert tensor_path_mismatch(image_transform_v2(PreprocessCfg(size=224), is_train=False), 224) is None
    squash = image_transform_v2(PreprocessCfg(size=224, resize_mode="squash"), is_train=False)
    assert "not Resize, CenterCrop, Normalize" in tensor_path_mismatch(squash, 224)


def test_prefetching_stage_prepares_the_next_batch_while_the_current_one_computes():
    import threading
    import time

    from saferclip_data.pipeline.worker import batch_results

    events: list[tuple[str, int, str]] = []

    class Slow(Stage):
        name = "slow"
        prefetch = True

        def prepare_batch(self, batch):
            events.append(("prepare start", batch["x"][0].as_py(), threading.current_thread().name))
            time.sleep(0.05)
            return batch

        def compute_batch(self, prepared):
            events.append(("compute start", prepared["x"][0].as_py(), threading.current_thread().name))
            time.sleep(0.05)
            events.append(("compute end", prepared["x"][0].as_py(), ""))
            return BatchResult(prepared)

    batches = [pa.table({"x": [i]}) for i in range(4)]
    results = list(batch_results(Slow(Stage.Config(), {}), batches))
    assert [r.table["x"][0].as_py() for _, r in results] == [0, 1, 2, 3]  # order kept
    assert all(name.startswith("slow-prefetch") for kind, _, name in events if kind == "prepare start")
    for i in range(3):  # batch i+1 was being prepared before batch i finished computing
        assert events.index(("prepare start", i + 1, events[0][2])) < events.index(("compute end", i, ""))
    assert Slow(Stage.Config(), {}).process_batch(batches[0]).table["x"][0].as_py() == 0  # the pure call still works


def test_a_result_handed_back_as_a_function_is_finished_after_the_next_compute_starts():
    """Two batches in flight on the device: the host's bookkeeping of batch i waits until batch i+1 is queued."""
    from saferclip_data.pipeline.worker import batch_results

    events: list[tuple[str, int]] = []

    class Deferred(Stage):
        name = "deferred"
        prefetch = True

        def prepare_batch(self, batch):
            return batch

        def compute_batch(self, prepared):
            i = prepared["x"][0].as_py()
            events.append(("compute", i))

            def finish():
                events.append(("finish", i))
                return BatchResult(prepared.append_column("y", pa.array([i * 10])))

            return finish

    stage = Deferred(Stage.Config(), {})
    batches = [pa.table({"x": [i]}) for i in range(3)]
    results = list(batch_results(stage, batches))
    assert [(b["x"][0].as_py(), r.table["y"][0].as_py()) for b, r in results] == [(0, 0), (1, 10), (2, 20)]
    assert events == [("compute", 0), ("compute", 1), ("finish", 0), ("compute", 2), ("finish", 1), ("finish", 2)]
    assert stage.process_batch(batches[1]).table["y"].to_pylist() == [10]  # the pure call finishes it


class _SlowPrefetch(Stage):
    """A prefetch stage over upstream stage "a" that logs when each shard is read and each batch prepared and
    computed (with the thread doing it)."""

    name = "slowpf"
    prefetch = True
    inputs = {"a": ("key",)}
    events: list = []

    def read_shard(self, spec, workdir):
        self.events.append(("read", spec.shard_id))
        return super().read_shard(spec, workdir)

    def batch_rows(self) -> int:
        return 2

    def prepare_batch(self, batch):
        import time

        self.events.append(("prepare", batch["key"][0].as_py()))
        time.sleep(0.03)
        return batch

    def compute_batch(self, prepared):
        import time

        time.sleep(0.03)
        self.events.append(("computed", prepared["key"][0].as_py()))
        return BatchResult(prepared.append_column("n", pa.array([len(k.as_py()) for k in prepared["key"]])), [])


def test_a_worker_reads_the_announced_next_shard_while_its_last_batch_computes(tmp_path):
    wd = WorkDir(tmp_path)
    empty = pa.table({"key": pa.array([], pa.string())})
    shards = {"s0": ["a0", "a1", "a2"], "s1": ["b0", "b1", "b2", "b3"], "s2": ["c0"]}
    for shard, keys in shards.items():
        wd.write_shard("a", shard, pa.table({"key": keys}), empty, {}, {})
    events = _SlowPrefetch.events
    worker = ShardWorker(StageJob(_SlowPrefetch, _SlowPrefetch.Config(), {}, str(tmp_path)))
    committed = [worker.run_shard(ShardSpec("s0"), upcoming=ShardSpec("s1"))]
    # s1 was read while s0 computed (from its start: reading images takes longer than a batch on a GPU), and
    # its first batch prepared before s0's last batch finished computing
    assert events.index(("read", "s1")) < events.index(("computed", "a0"))
    assert events.index(("prepare", "b0")) < events.index(("computed", "a2"))
    committed.append(worker.run_shard(ShardSpec("s1"), upcoming=ShardSpec("s0")))  # announced s0, but s2 comes
    committed.append(worker.run_shard(ShardSpec("s2")))  # s2 is read anew
    committed.append(worker.drain())
    # each shard is reported once it is on disk: written behind, so in the call after its own
    assert [[s["shard"] for s in c] for c in committed] == [[], ["s0"], ["s1"], ["s2"]]
    assert [e for e in events if e[0] == "read"] == [("read", s) for s in ("s0", "s1", "s0", "s2")]
    assert events.count(("prepare", "b0")) == 1 and events.count(("computed", "b0")) == 1  # not prepared twice
    for shard, keys in shards.items():
        out = wd.read_shard("slowpf", shard)
        assert out["key"].to_pylist() == keys and out["n"].to_pylist() == [2] * len(keys)


def test_a_worker_writes_a_shard_while_the_next_one_computes_and_reports_it_once_written(tmp_path):
    """The parquet write of a shard overlaps the next shard's compute; a shard is reported only
    once its marker is on disk; a write that fails is raised by the next call, naming nothing lost silently."""
    import threading
    import time

    wd = WorkDir(tmp_path)
    empty = pa.table({"key": pa.array([], pa.string())})
    for shard in ("s0", "s1", "s2"):
        wd.write_shard("a", shard, pa.table({"key": [f"{shard}k{i}" for i in range(4)]}), empty, {}, {})
    events = _SlowPrefetch.events
    events.clear()
    worker = ShardWorker(StageJob(_SlowPrefetch, _SlowPrefetch.Config(), {}, str(tmp_path)))
    write = worker.workdir.write_shard

    def slow_write(stage, shard_id, *args):
        events.append(("write", shard_id, threading.current_thread().name))
        time.sleep(0.2)
        if shard_id == "s1":
            raise OSError("disk full")
        write(stage, shard_id, *args)
        events.append(("written", shard_id))

    worker.workdir.write_shard = slow_write
    assert worker.run_shard(ShardSpec("s0")) == []
    assert not wd.shard_done("slowpf", "s0")  # not on disk yet, so not reported
    assert [s["shard"] for s in worker.run_shard(ShardSpec("s1"))] == ["s0"]
    assert wd.shard_done("slowpf", "s0")
    # s0 was written on the writer thread while s1's batches computed
    start = next(i for i, e in enumerate(events) if e[:2] == ("write", "s0"))
    assert "writer" in events[start][2]
    assert ("computed", "s1k0") in events[start : events.index(("written", "s0"))]
    with pytest.raises(OSError, match="disk full"):  # s1's write failed: the next call says so
        worker.run_shard(ShardSpec("s2"))
    assert not wd.shard_done("slowpf", "s1")


@pytest.mark.parametrize("behind", [False, True], ids=["writes-in-call", "writes-behind"])
def test_ray_dispatch_announces_each_actors_next_shard_and_requeues_a_lost_actors_shards(behind):
    """The Ray executor's scheduling with a stand-in for ray: every shard is committed once, each actor's
    announced next shard is the one it runs next, and a lost actor's shards — the one it ran, the one it was
    writing behind, the one promised to it — go back to the queue. With ``behind``, actors commit each shard in
    their next call, or when asked to drain, as a prefetch stage's worker does."""
    from ray.exceptions import RayActorError

    from saferclip_data.pipeline.executors import RayExecutor

    calls: list[tuple[int, str, str | None]] = []
    lose_once: set[str] = set()

    class Ref:
        def __init__(self, actor, spec, upcoming):
            self.actor, self.spec, self.upcoming = actor, spec, upcoming

    class Actor:
        def __init__(self, index):
            self.index, self.writing = index, None
            self.run_shard, self.drain = self, types.SimpleNamespace(remote=lambda: Ref(self, None, None))

        def remote(self, spec, on_batch, upcoming):
            calls.append((self.index, spec.shard_id, upcoming.shard_id if upcoming else None))
            return Ref(self, spec, upcoming)

    class FakeRay:
        @staticmethod
        def wait(refs, num_returns):
            return refs[:1], refs[1:]

        @staticmethod
        def get(ref):
            actor, spec = ref.actor, ref.spec
            if spec is not None and spec.shard_id in lose_once:
                lose_once.discard(spec.shard_id)
                actor.writing = None  # what it was writing is lost with it
                raise RayActorError()
            if not behind:
                return [{"shard": spec.shard_id}] if spec else []
            committed = [{"shard": actor.writing}] if actor.writing else []
            actor.writing = spec.shard_id if spec else None
            return committed

    for actors, shards, lost in [(1, 1, ""), (1, 2, ""), (1, 5, "s2"), (2, 3, ""), (2, 7, "s3"), (3, 8, "s7")]:
        calls.clear()
        lose_once.add(lost)
        specs = [ShardSpec(f"s{i}") for i in range(shards)]
        pool = [Actor(i) for i in range(actors)]
        done = [s["shard"] for s in RayExecutor._shards_on(FakeRay, pool, specs)]
        assert sorted(done) == sorted(s.shard_id for s in specs), (actors, shards)  # each once, none left
        assert all(actor.writing is None for actor in pool)  # every actor drained
        for actor in range(actors):
            runs = [(shard, upcoming) for a, shard, upcoming in calls if a == actor]
            for (shard, upcoming), (next_shard, _) in zip(runs, runs[1:]):
                if upcoming is not None and shard != lost:  # a lost actor's promise was requeued
                    assert upcoming == next_shard
            if runs:
                assert runs[-1][1] is None  # nothing announced that it did not run
        if lost:
            assert sum(1 for _, shard, _ in calls if shard == lost) == 2  # retried once
            if behind and int(lost[1:]) >= actors:  # the shard its actor was writing when lost ran again too
                before = [shard for a, shard, _ in calls if shard != lost]
                assert len(before) > len(set(before)), (actors, shards, calls)


def test_actor_plan_shares_gpus_on_auto_and_never_asks_for_more_than_the_cluster_has():
    from saferclip_data.pipeline.errors import UserError
    from saferclip_data.pipeline.executors import plan_actors
    from saferclip_data.pipeline.stage import StageConfig

    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    assert plan_actors("embed", StageConfig(gpus="auto", cpus=4), 1, one_gpu) == (1, 1.0, "")
    assert plan_actors("embed", StageConfig(gpus="auto", cpus=4), 2, one_gpu) == (2, 0.5, "")  # two feed one GPU
    assert plan_actors("embed", StageConfig(gpus="auto", cpus=1), 3, {"CPU": 8.0}) == (3, 0.0, "")
    count, gpus, note = plan_actors("embed", StageConfig(gpus=1, cpus=1), 3, one_gpu)
    assert (count, gpus) == (1, 1.0) and "running 1 worker" in note  # not two actors waiting forever
    count, _, note = plan_actors("embed", StageConfig(gpus=0, cpus=1, concurrency=4), 4, {"CPU": 2.0})
    assert count == 2 and "concurrency 4" in note
    with pytest.raises(UserError, match="stage embed: one worker asks for cpus 4"):
        plan_actors("embed", StageConfig(gpus=0, cpus=4), 1, {"CPU": 2.0})


def test_embed_batch_size_follows_the_device_unless_set(embed_stage):
    assert embed_stage.config.batch_size is None and embed_stage.batch_rows() == 64  # CPU worker
    assert EmbedStage(EmbedConfig(batch_size=8), {}).batch_rows() == 8


def test_shard_files_leave_vectors_and_blobs_out_of_dictionary_encoding_and_statistics(tmp_path):
    """Every float of an embedding column was a dictionary candidate and a min/max statistic: 2.8x slower
    writes and 3.5x slower reads of an embed shard. Scalar columns keep both; the table reads back the same."""
    import pyarrow.parquet as pq

    from saferclip_data.stages.embed import to_fixed_list

    vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    table = pa.table({"key": [f"k{i}" for i in range(64)], "n": list(range(64)),
                      "image": pa.array([b"\xff\xd8" + bytes([i]) for i in range(64)]),
                      "image_embedding": to_fixed_list(vectors, np.ones(64, bool))})  # fmt: skip
    wd = WorkDir(tmp_path)
    wd.write_shard("embed", "part-00000", table, pa.table({"key": pa.array([], pa.string())}), {}, {})
    path = wd.shard_path("embed", "part-00000")
    assert pq.read_table(path).equals(table)
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema.split(".")[0]: group.column(i) for i in range(group.num_columns)}
    dictionary = {name: any("DICTIONARY" in e for e in c.encodings) for name, c in columns.items()}
    assert dictionary == {"key": True, "n": True, "image": False, "image_embedding": False}
    assert {name: c.is_stats_set for name, c in columns.items()} == {
        "key": True, "n": True, "image": True, "image_embedding": False}  # fmt: skip
