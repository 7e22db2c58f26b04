"""Malformed recipes: one line naming file and key path, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from conftest import recipe_dict, run_cli, write_recipe


def _mutations(manifest):
    def base():
        return recipe_dict(manifest)

    def with_(fn):
        data = base()
        fn(data)
        return data

    return {
        "unknown top-level key": (with_(lambda d: d.update(colour="blue")), "colour", "unknown key"),
        "unknown stage key": (
            with_(lambda d: d["stages"]["embed"].update(batchsize=3)),
            "stages.embed.batchsize",
            "unknown key",
        ),
        "unknown stage": (with_(lambda d: d["stages"].update(frobnicate={})), "stages.frobnicate", "unknown key"),
        "wrong type": (
            with_(lambda d: d["stages"]["embed"].update(batch_size="many")),
            "stages.embed.batch_size",
            "integer",
        ),
        "negative batch size": (
            with_(lambda d: d["stages"]["embed"].update(batch_size=-4)),
            "stages.embed.batch_size",
            "greater than 0",
        ),
        "missing source path": (
            with_(lambda d: d["source"].update(path="/nonexistent/m.csv")),
            "source.path",
            "manifest file not found: /nonexistent/m.csv",
        ),
        "unknown model": (
            with_(lambda d: d["model"].update(arch="ViT-Z-99")),
            "model.arch",
            "unknown open_clip architecture 'ViT-Z-99'",
        ),
        "unknown pretrained tag": (
            with_(lambda d: d["model"].update(arch="ViT-B-32", pretrained="nosuchtag")),
            "model.pretrained",
            "unknown tag 'nosuchtag' for ViT-B-32 (known: openai",
        ),
        "missing checkpoint": (
            with_(lambda d: d["model"].update(pretrained="/nonexistent/ckpt.pt")),
            "model.pretrained",
            "checkpoint file not found",
        ),
        "missing source section": (with_(lambda d: d.pop("source")), "source", "required key is missing"),
        "unknown source kind": (with_(lambda d: d["source"].update(kind="ftp")), "source.kind", "Input should be"),
        "bad concurrency type": (
            with_(lambda d: d["stages"]["embed"].update(concurrency=[1])),
            "stages.embed.concurrency",
            "integer",
        ),
        "unset env var": (
            with_(lambda d: d["source"].update(path="${SAFERCLIP_TEST_UNSET_VAR}/m.csv")),
            "source.path",
            "environment variable SAFERCLIP_TEST_UNSET_VAR is not set",
        ),
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from helpers import write_image_manifest

    return write_image_manifest(tmp_path_factory.mktemp("m"), 4)


CASES = list(_mutations("x"))


@pytest.mark.parametrize("case", CASES)
def test_malformed_recipe_is_one_line_exit_2(case, manifest, tmp_path, cli):
    data, key_path, expected = _mutations(manifest)[case]
    path = write_recipe(tmp_path / "bad.yaml", data)
    code, out, err = cli("validate", str(path))
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert str(path) in lines[0]
    assert f": {key_path}" in lines[0]
    assert expected in lines[0]


def test_bad_yaml_names_line(tmp_path, cli):
    path = tmp_path / "broken.yaml"
    path.write_text("name: t\nsource: [unclosed\n  kind: manifest\n")
    code, _, err = cli("validate", str(path))
    assert code == 2
    assert err.count("\n") == 1 and str(path) in err and "invalid YAML at line" in err


def test_not_a_mapping_and_missing_file(tmp_path, cli):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "expected a mapping of recipe keys, got list" in err
    code, _, err = cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "recipe file not found" in err and "nope.yaml" in err


def test_env_interpolation_and_relative_paths(tmp_path, manifest, cli, monkeypatch):
    monkeypatch.setenv("SAFERCLIP_TEST_SRC", str(manifest.parent))
    data = recipe_dict(manifest)
    data["source"]["path"] = "${SAFERCLIP_TEST_SRC}/manifest.csv"
    data["workdir"] = "${SAFERCLIP_TEST_WORK:-" + str(tmp_path / "w") + "}"
    code, out, err = cli("validate", str(write_recipe(tmp_path / "ok.yaml", data)))
    assert code == 0, err
    assert "source -> embed" in out and str(tmp_path / "w") in out
    # a relative source path resolves against the recipe's folder, not the current directory
    data["source"]["path"] = "manifest.csv"
    code, out, err = cli("validate", str(write_recipe(manifest.parent / "rel.yaml", data)))
    assert code == 0, err


def test_subprocess_user_error_has_no_traceback(tmp_path, manifest):
    data = recipe_dict(manifest)
    data["stages"]["embed"]["batch_size"] = 0
    proc = run_cli("build", str(write_recipe(tmp_path / "bad.yaml", data)), "--executor", "local")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "stages.embed.batch_size" in proc.stderr


def test_recipe_yaml_is_loaded_safely(tmp_path, cli):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "invalid YAML" in err and "python/object" in err


def test_the_embedded_default_recipe_is_the_demo_and_valid(cli):
    code, out, err = cli("validate")
    assert code == 0, err
    assert out.startswith("recipe ok: demo: source -> embed")


def test_usage_errors_are_one_clear_line_whatever_click_typer_brings(cli):
    """typer vendors its own click since 0.20: its usage errors must still end as click prints them, exit 2."""
    code, _, err = cli("build", "--nope")
    assert code == 2 and "No such option: --nope" in err and "Traceback" not in err
    code, _, err = cli("bench", "embed", "--gpus", "abc")
    assert code == 2 and "Invalid value for '--gpus'" in err and "Traceback" not in err


def test_a_misspelt_key_is_named_first_with_a_suggestion(tmp_path, manifest_200, cli):
    data = recipe_dict(manifest_200)
    data["sourse"] = data.pop("source")
    code, _, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "sourse: unknown key (did you mean 'source'?)" in err
    data = recipe_dict(manifest_200)
    data["stages"]["embed"]["batch_sise"] = 8
    code, _, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert code == 2 and "stages.embed.batch_sise: unknown key (did you mean 'batch_size'?)" in err
    data["stages"]["embed"] = {"zzz": 1}
    code, _, err = cli("validate", str(write_recipe(tmp_path / "r.yaml", data)))
    assert code == 2 and "stages.embed.zzz: unknown key" in err and "did you mean" not in err


def test_status_of_something_that_is_not_a_work_dir_is_one_line(tmp_path, cli):
    (tmp_path / "folder").mkdir()
    code, out, err = cli("status", str(tmp_path / "folder"))
    assert code == 2 and "is not a work dir" in err and len(err.strip().splitlines()) == 1 and not out
    code, _, err = cli("status", str(tmp_path / "missing"))
    assert code == 2 and f"no work dir or recipe at {tmp_path / 'missing'}" in err
    assert len(err.strip().splitlines()) == 1
