"""Real-world sources on local stand-ins: img2dataset against a loopback HTTP server (every URL ends in a shard
or in the rejects with img2dataset's status; failures retried on the next build), and the published layouts
(ViSU-Text, NSFW-Caps, LAION parquet) built through to training shards."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loopback import Server, image_bytes, slow, static
from PIL import Image

from saferclip_data.pipeline.workdir import WorkDir

from conftest import write_recipe


def _recipe(work, source: dict, stages: dict | None = None) -> dict:
    return {
        "name": "src",
        "workdir": str(work),
        "source": source,
        "model": {"arch": "toy-resnet-tiny", "pretrained": None, "init_seed": 0},
        "stages": stages or {},
    }


def _outcome(work) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
    wd = WorkDir(work)
    kept = dict(zip(*wd.read_stage_columns("source", ["key", "image"]).to_pydict().values()))
    rejects = {r["key"]: (r["reason"], r["error"]) for r in wd.rejects("source").to_pylist()}
    return kept, rejects


@pytest.mark.slow
def test_img2dataset_every_url_ends_in_a_shard_or_a_reject_and_failures_are_retried(tmp_path, cli):
    jpeg, png = image_bytes("JPEG", (200, 30, 30), 64), image_bytes("PNG", (30, 200, 30), 64)
    routes = {
        "/a.jpg": static(jpeg),
        "/b.png": static(png, "image/png"),
        "/slow.jpg": slow(jpeg, 4),
        "/page.html": static(b"<html>not an image</html>", "text/html"),
    }
    with Server(routes) as server:
        names = ["a.jpg", "b.png", "missing.jpg", "slow.jpg", "page.html"]
        manifest = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"key": [n.split(".")[0] for n in names], "url": [f"{server.url}/{n}" for n in names],
                                 "caption": [f"picture {n}" for n in names]}), manifest)  # fmt: skip
        download = {"image_size": 32, "timeout": 1, "threads": 4, "rerun_attempts": 1}
        source = {"kind": "manifest", "path": str(manifest), "image_column": "url", "download": download}
        recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path / "w", source))
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        kept, rejects = _outcome(tmp_path / "w")
        assert set(kept) | set(rejects) == {"a", "b", "missing", "slow", "page"} and not set(kept) & set(rejects)
        assert set(kept) == {"a", "b"}
        for key in kept:  # resized by img2dataset to 32 px and re-encoded as JPEG
            image = Image.open(io.BytesIO(kept[key]))
            assert image.format == "JPEG" and image.size == (32, 32)
        assert rejects["missing"][0] == "download failed_to_download" and "404" in rejects["missing"][1]
        assert rejects["slow"][0] == "download failed_to_download" and "timed out" in rejects["slow"][1]
        assert rejects["page"][0] == "download failed_to_resize"
        assert all(server.url in detail for _, detail in rejects.values())

        server.routes["/missing.jpg"] = static(png, "image/png")  # the server has it now
        server.hits.clear()
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        assert sorted(server.hits) == ["/missing.jpg", "/page.html", "/slow.jpg"]  # only the failures again
        kept, rejects = _outcome(tmp_path / "w")
        assert set(kept) == {"a", "b", "missing"} and set(rejects) == {"slow", "page"}
        assert "attempt 2" in rejects["slow"][1]

        server.hits.clear()
        code, out, err = cli("build", str(recipe), "--executor", "local", "--no-progress")
        assert code == 0, err
        assert server.hits == [] and "up to date" in out + err  # rerun_attempts: 1 is spent
