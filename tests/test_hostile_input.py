"""Hostile input: every record is kept or rejected with a reason, and images are read as they are meant."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from saferclip_data.models.decode import to_rgb
from saferclip_data.pipeline.workdir import WorkDir

from conftest import run_cli, write_recipe
from helpers import scene, write_tar


def _source_only(tmp_path, source: dict) -> dict:
    return {"name": "hostile", "workdir": str(tmp_path / "work"), "source": {"require_image": False, **source},
            "model": {"arch": "toy-resnet-tiny", "pretrained": None}, "stages": {}}  # fmt: skip


def _accounted(tmp_path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    wd = WorkDir(tmp_path / "work")
    kept = set(wd.read_stage_columns("source", ["key"])["key"].to_pylist())
    rejects = {r["key"]: (r["reason"], r["error"]) for r in wd.rejects("source").to_pylist()}
    return kept, rejects


def test_a_repeated_tar_member_or_sample_key_is_a_reject_with_its_reason(tmp_path, cli):
    members = []
    for i in range(7):
        image, caption = scene(i)
        members += [(f"s{i}.jpg", image), (f"s{i}.txt", caption.encode())]
        if i == 3:
            members.append((f"s{i}.jpg", scene(99)[0]))  # which image is s3's? neither is trusted
    members.append(("s5.txt", b"a second run of an earlier key"))  # members of a sample must be contiguous
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "a.tar", members)
    recipe = write_recipe(
        tmp_path / "r.yaml", _source_only(tmp_path, {"kind": "webdataset", "path": str(tmp_path / "tars")})
    )
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    kept, rejects = _accounted(tmp_path)
    assert kept == {"s0", "s1", "s2", "s4", "s5", "s6"}
    assert rejects["s3"][0] == "repeated tar member" and "s3.jpg appears twice" in rejects["s3"][1]
    assert [r for r in WorkDir(tmp_path / "work").rejects("source").to_pylist() if r["key"] == "s5"][0]["reason"] == (
        "repeated sample key"
    )
    manifest = WorkDir(tmp_path / "work").manifest("source")["counts"]
    assert manifest == {"in": 8, "out": 6, "rejected": 2}  # 7 samples + the stray run: nothing vanished


def test_a_csv_caption_that_is_not_utf8_rejects_its_record_only(tmp_path, cli):
    rows = [b"key,caption", b"r1,a red ball", b"r2,caf\xe9 in latin-1", b"r3,a blue box"]
    (tmp_path / "m.csv").write_bytes(b"\n".join(rows) + b"\n")
    recipe = write_recipe(
        tmp_path / "r.yaml", _source_only(tmp_path, {"kind": "manifest", "path": str(tmp_path / "m.csv")})
    )
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    kept, rejects = _accounted(tmp_path)
    assert kept == {"r1", "r3"}
    assert rejects["r2"][0] == "undecodable text" and "column caption, data row 2" in rejects["r2"][1]


def test_sixteen_bit_images_are_scaled_not_clipped():
    rgb = np.asarray(Image.open(io.BytesIO(scene(4, size=48, fmt="PNG")[0])).convert("L"), np.uint16)
    wide = Image.fromarray((rgb * 257).astype(np.uint16))  # the same picture in 16 bits (mode I;16)
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    decoded = np.asarray(to_rgb(Image.open(io.BytesIO(buffer.getvalue()))), np.float64)[..., 0]
    assert np.abs(decoded - rgb).mean() / 255 < 0.01  # convert("RGB") alone: ~0.9 (nearly every pixel white)
    wide_f = Image.fromarray(rgb.astype(np.float32) / 255)  # mode F
    assert np.abs(np.asarray(to_rgb(wide_f), np.float64)[..., 0] - rgb).mean() / 255 < 0.01


def test_images_are_turned_by_their_exif_orientation_and_transparency_lies_on_white():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    shown = to_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    assert shown.size == (20, 40)  # as displayed: portrait
    top = np.asarray(shown)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red left side is now on top
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255  # transparent, not black


def test_temp_files_a_killed_run_left_anywhere_in_a_stage_folder_are_removed(tmp_path):
    wd = WorkDir(tmp_path)
    left = [
        tmp_path / "shards" / "quad" / ".quad-000001.tar.tmp-4242",
        tmp_path / "shards" / ".x.parquet.tmp-1a2b",
        tmp_path / "mine" / "_runs" / "text" / ".000003.parquet.tmp-9",
        tmp_path / "shards" / ".selection.parquet.tmp",
    ]
    kept = tmp_path / "shards" / "quad" / "quad-000000.tar"
    for path in [*left, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert wd.clean_temp_files("shards") == 3 and wd.clean_temp_files("mine") == 1
    assert not any(p.exists() for p in left) and kept.exists()


def test_a_manifest_row_without_a_key_is_rejected_not_named_none(tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a", None, "c", ""], "caption": ["one", "two", "three", "four"]}),
                   tmp_path / "m.parquet")  # fmt: skip
    source = {"kind": "manifest", "path": str(tmp_path / "m.parquet")}
    code, _, err = cli("build", str(write_recipe(tmp_path / "r.yaml", _source_only(tmp_path, source))),
                       "--executor", "local", "--no-progress")  # fmt: skip
    assert code == 0, err
    kept, rejects = _accounted(tmp_path)
    assert kept == {"a", "c"} and "None" not in kept
    assert {k: v[0] for k, v in rejects.items()} == {"m_row000000001": "missing key", "m_row000000003": "missing key"}


BAD_RECIPES = {
    "alias bomb": (
        "name: x\na0: &a0 [l, l, l, l, l, l, l, l, l]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)),
        "expands to more than 100,000 values",
    ),
    "self-referencing anchor": ("name: x\nloop: &l [1, *l]\n", "an anchor contains itself"),
    "2,000 nested lists": ("name: x\nv: " + "[" * 2000 + "]" * 2000 + "\n", "nested deeper than 64 levels"),
    "a key twice": ("name: x\nmodel: {arch: ViT-B-32}\nmodel: {arch: ViT-L-14}\n", "model: key given twice (lines 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_recipes_that_would_hang_or_crash_the_loader_are_one_line(tmp_path, case):
    import time

    text, expected = BAD_RECIPES[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    started = time.perf_counter()
    proc = run_cli("validate", str(path), timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr and str(path) in proc.stderr, proc.stderr[-500:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 30


def test_word_bounds_that_no_caption_can_meet_are_refused_at_validate(tmp_path, manifest_200, cli):
    from conftest import recipe_dict

    data = recipe_dict(manifest_200)
    data["stages"]["filter"] = {"caption_words": {"min": 10, "max": 2}}
    code, _, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert code == 2 and "stages.filter.caption_words: min 10 is above max 2" in err


def test_a_stage_whose_upstream_is_not_enabled_names_the_recipe_file(tmp_path, manifest_200, cli):
    from conftest import recipe_dict

    data = recipe_dict(manifest_200)
    data["stages"] = {"score": {}}
    path = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = cli("validate", str(path))
    assert code == 2 and str(path) in err and "stages.score needs stage 'embed'" in err


def test_the_image_probe_is_not_fitted_on_the_zero_vectors_of_text_only_records():
    from saferclip_data.stages.probe import fit_probes

    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(300)]
    labels = rng.integers(0, 2, 300)
    image = rng.standard_normal((300, 8)).astype(np.float32) + labels[:, None] * 1.5
    has_image = np.arange(300) < 200
    image[~has_image] = 0.0  # text-only records: no image embedding (zeros in the matrix)
    masked = np.where(has_image, labels, -1)
    arrays, summary = fit_probes({"image": image}, {"image": masked}, keys, ["safe", "hate"], folds=2, c=1.0)
    alone, _ = fit_probes({"image": image[:200]}, labels[:200], keys[:200], ["safe", "hate"], folds=2, c=1.0)
    for name, value in alone.items():
        assert np.allclose(arrays[name], value, atol=1e-5), name  # as if the text-only records were not there
    assert summary["labelled"] == 200


def test_a_bad_checkpoint_is_refused_at_validate(tmp_path, manifest_200, cli):
    import pickle

    import torch

    from saferclip_data.models.clip import load_clip

    from conftest import recipe_dict

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "code.pt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    torch.save({"state_dict": load_clip("toy-vit-tiny").model.state_dict()}, tmp_path / "tiny.pt")  # 128-d
    expected = {"noise.pt": "is not a readable weights file", "code.pt": "is not a readable weights file",
                "tiny.pt": "embeds 128-d, but model.arch ViT-B-32 embeds 512-d"}  # fmt: skip
    for name, message in expected.items():
        data = recipe_dict(manifest_200)
        data["model"] = {"arch": "ViT-B-32", "pretrained": str(tmp_path / name)}
        code, out, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
        assert code == 2 and message in err and "model.pretrained" in err, (name, err)
        assert "this ran" not in out + err and len(err.strip().splitlines()) == 1
    data["model"] = {"arch": "toy-vit-tiny", "pretrained": str(tmp_path / "tiny.pt")}
    code, _, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert code == 0, err


def test_a_relative_workdir_is_the_recipes_and_a_file_is_refused(tmp_path, manifest_200, cli):
    from conftest import recipe_dict

    data = recipe_dict(manifest_200)
    data["workdir"] = "out/w"
    (tmp_path / "recipes").mkdir()
    code, out, err = cli("validate", str(write_recipe(tmp_path / "recipes" / "r.yaml", data)))
    assert code == 0 and str(tmp_path / "recipes" / "out" / "w") in out, (out, err)
    (tmp_path / "recipes" / "file").write_text("not a folder")
    data["workdir"] = "file"
    code, _, err = cli("validate", str(write_recipe(tmp_path / "recipes" / "r.yaml", data)))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_a_gif_in_a_tar_is_read_like_a_gif_in_a_manifest(tmp_path, cli):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buffer, format="GIF")
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "a.tar", [("g0.gif", buffer.getvalue()), ("g0.txt", b"a red square")])
    source = {"kind": "webdataset", "path": str(tmp_path / "tars"), "require_image": True}
    code, _, err = cli("build", str(write_recipe(tmp_path / "r.yaml", _source_only(tmp_path, source))),
                       "--executor", "local", "--no-progress")  # fmt: skip
    assert code == 0, err
    kept, rejects = _accounted(tmp_path)
    assert kept == {"g0"} and not rejects


def test_a_full_disk_is_one_line_naming_the_path_and_the_rerun_completes(tmp_path, manifest_200, cli, monkeypatch):
    import errno

    import saferclip_data.stages  # noqa: F401 - imported before the patch, so no stage binds the failing writer
    from saferclip_data.pipeline import workdir as workdir_module

    from conftest import recipe_dict

    data = recipe_dict(manifest_200)
    data["workdir"] = str(tmp_path / "full")
    recipe = write_recipe(tmp_path / "r.yaml", data)
    real = workdir_module.atomic_write_parquet
    written = []

    def full_after_three(path, table):
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(path, table)

    monkeypatch.setattr(workdir_module, "atomic_write_parquet", full_after_three)
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no space left on the device" in err and ".parquet" in err and "run the same command again" in err
    monkeypatch.setattr(workdir_module, "atomic_write_parquet", real)
    code, _, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
    assert code == 0, err
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "whole"), "--executor", "local", "--no-progress")
    assert code == 0, err
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").glob("*/part-*.parquet"))
    assert len(files) == 2 * 4 * 2  # source and embed, 4 shards, output and rejects
    for rel in files:  # the resumed build equals an uninterrupted one
        assert (tmp_path / "full" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes(), rel
    assert not list((tmp_path / "full").rglob(".*.tmp*"))


def test_shards_of_a_modality_that_is_not_mined_are_refused_at_validate(tmp_path, cli):
    from helpers import safety_recipe

    data = safety_recipe(tmp_path / "work")
    data["stages"]["shards"] = {"modality": "image"}  # the recipe mines text and text->image only
    path = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = cli("validate", str(path))
    assert code == 2 and str(path) in err and "stages.shards.modality: 'image' targets are not mined" in err


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_build_leaves_no_ray_process_behind(tmp_path, manifest_200):
    """SIGKILL of the build's own process (not its group): the embedded Ray's processes are gone 15 s later."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from conftest import CLI, recipe_dict

    data = recipe_dict(manifest_200, batch_size=4)
    data["source"]["shard_size"] = 10
    recipe = write_recipe(tmp_path / "r.yaml", data)
    build = subprocess.Popen([*CLI, "build", str(recipe), "-w", str(tmp_path / "work"), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    started: list = []
    while time.time() < deadline and build.poll() is None:
        started = psutil.Process(build.pid).children(recursive=True)
        names = " ".join(p.name() for p in started if p.is_running())
        if list((tmp_path / "work" / "embed").glob("*.done.json")) and "raylet" in names:
            break
        time.sleep(0.2)
    assert build.poll() is None and started, "the build ended before it could be killed"
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    time.sleep(15)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def test_a_full_disk_error_without_a_file_name_names_the_work_dir(tmp_path, manifest_200, cli, monkeypatch):
    import errno

    import saferclip_data.stages  # noqa: F401 - imported before the patch, so no stage binds the failing writer
    from saferclip_data.pipeline import workdir as workdir_module

    from conftest import recipe_dict

    data = recipe_dict(manifest_200)
    data["workdir"] = str(tmp_path / "full")

    def full(path, table):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write through a pipe or a mapped file says

    monkeypatch.setattr(workdir_module, "atomic_write_parquet", full)
    code, _, err = cli("build", str(write_recipe(tmp_path / "r.yaml", data)), "--executor", "local", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"work dir {tmp_path / 'full'}" in err and "::" not in err and "no space left on the device" in err
