"""The shards stage's writing step: one task per (kind, group) writes that group's samples, in digest order, as
a run of tars numbered after the groups before it, fetching with img2dataset first the images it has only URLs
for (only selected records' images are ever fetched; a failed download becomes the sample's status)."""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.stage import worker_identity
from saferclip_data.pipeline.workdir import atomic_path, remove_tree
from saferclip_data.stages import download
from saferclip_data.stages.samples import image_extension, quad_sample, sha256_file
from saferclip_data.stages.shards.plan import task_dir, write_piece


def fetch(root: str, name: str, urls: dict[str, str], options: Any) -> dict[str, tuple[tuple | None, str]]:
    """key -> (where img2dataset put its image: (tar, offset, size), or None and why not) for these URLs. Only the
    places are kept: the tar writer reads each image when it writes it, so a task holds one fetched image at a
    time however many its tars take."""
    if not urls:
        return {}
    folder = task_dir(root, "fetch", name)
    remove_tree(folder)
    index = download.run_attempt(folder, urls, options)
    out = {}
    for row in index.to_pylist():
        if row["status"] == "success":
            out[row["key"]] = ((row["tar"], row["offset"], row["size"]), "")
        else:
            out[row["key"]] = (None, f"download {row['status']}: {row['error'] or ''}".strip())
    return out


class FetchedImages:
    """The fetched images of one tar group, read from img2dataset's tars when their samples are written: one open
    file per img2dataset tar (not one open per image), one image in memory at a time."""

    def __init__(self, fetched: dict[str, tuple[tuple | None, str]]):
        self.fetched, self.files = fetched, {}

    def __contains__(self, key: str) -> bool:
        return key in self.fetched

    def get(self, key: str) -> tuple[bytes | None, str]:
        """The image of ``key`` (None and why where it was not fetched)."""
        where, why = self.fetched.get(key, (None, ""))
        if where is None:
            return None, why
        tar, offset, size = where
        if tar not in self.files:
            self.files[tar] = open(tar, "rb")  # noqa: SIM115 - closed by close(), after the group's last sample
        handle = self.files[tar]
        handle.seek(offset)
        return handle.read(size), ""

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


@dataclass
class Requested:
    """The records a group's quad samples asked for (targets, given pairs): per requester and kind of request the
    rows of ``info`` and of the float16 ``vectors`` (numpy rows: as Python lists they would take ~25x)."""

    asked: dict[str, dict[str, list[int]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    info: dict[str, list] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str, g: int) -> Requested:
        out = cls()
        parts = sorted(task_dir(root, "resolved", f"{g:05d}").glob("*.parquet"))
        if not parts:
            return out
        resolved = pa.concat_tables([pq.read_table(p) for p in parts])
        for i, (requester, what) in enumerate(zip(resolved["requester"].to_pylist(), resolved["what"].to_pylist())):
            out.asked[requester][what].append(i)
        out.info = {c: resolved[c].to_pylist() for c in ("need", "caption", "image", "url")}
        for column in ("text", "image_vector"):
            flat = resolved[column].combine_chunks()
            out.vectors[column] = np.asarray(flat.flatten().to_numpy(), np.float16).reshape(len(flat), -1)
        return out

    def urls(self) -> dict[str, str]:
        """Given pairs that have a URL but no image bytes."""
        info = self.info
        return {info["need"][i]: info["url"][i] for per in self.asked.values() for i in per["given"]
                if not info["image"][i] and info["url"][i]}  # fmt: skip


class TarRun:
    """A group's run of tars: ``samples_per_shard`` samples each, written whole to a temporary name and renamed
    when full; per-tar stats (samples, bytes, sha256, categories and difficulties of quad samples)."""

    def __init__(self, folder: Path, kind: str, first_tar: int, per_tar: int):
        self.folder, self.kind, self.per_tar = folder, kind, per_tar
        self.index, self.written, self.stats = first_tar - 1, 0, {}
        self._open = ExitStack()  # closing it closes the writer, then renames the file
        self._writer = self._path = None
        self._counts: dict[str, Counter] = {}

    def add(self, sample: dict, category: str | None = None, difficulty: str | None = None) -> tuple[str, int]:
        """Write one sample; returns its tar (``kind/name``) and its order in the group."""
        import webdataset as wds

        if self.written % self.per_tar == 0:
            self.close()
            self.index += 1
            self._path = self.folder / f"{self.kind}-{self.index:06d}.tar"
            tmp = self._open.enter_context(atomic_path(self._path))
            self._writer = self._open.enter_context(
                wds.TarWriter(str(tmp), mtime=0, user="saferclip", group="saferclip", mode=0o444)
            )
            self._counts = {"samples": Counter(), "categories": Counter(), "difficulty": Counter()}
        self._writer.write(sample)
        self._counts["samples"]["n"] += 1
        if category is not None:
            self._counts["categories"][category] += 1
            self._counts["difficulty"][difficulty] += 1
        self.written += 1
        return f"{self.kind}/{self._path.name}", self.written - 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._open.close()
        path = self._path
        entry = {"samples": self._counts["samples"]["n"], "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if self.kind == "quad":
            entry |= {k: dict(sorted(self._counts[k].items())) for k in ("categories", "difficulty")}
        self.stats[path.name] = entry
        self._writer = None


def write_group(root: str, kind: str, g: int, first_tar: int, s: dict, options: Any) -> dict[str, Any]:
    """Step 3: the tars of one (kind, group), numbered from ``first_tar``; returns their stats."""
    folder = task_dir(root, "samples", f"{kind}-{g:05d}")
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).to_pylist()
    rows.sort(key=lambda r: (r["digest"], r["key"]))
    req = Requested.read(root, g) if kind == "quad" else Requested()
    urls = {r["key"]: r["url"] for r in rows if not r["image"] and r["url"]} | req.urls()
    fetched = FetchedImages(fetch(root, f"{kind}-{g:05d}", urls, options))
    out_dir = Path(root) / "shards" / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    run = TarRun(out_dir, kind, first_tar, s["samples_per_shard"])
    statuses = []
    for r in rows:
        image, why = r["image"], ""
        if not image and r["key"] in fetched:
            image, why = fetched.get(r["key"])
        if kind == "plain":
            if not image:
                statuses.append((r["key"], r["shard"], f"safe image not fetched ({why or 'no image'})", None, None))
                continue
            tar, order = run.add({"__key__": r["key"], image_extension(image): image, "txt": r["caption"]})
            statuses.append((r["key"], r["shard"], "plain", tar, order))
            continue
        sample = _quad(r, image, req, fetched, s["modality"])
        if sample is None:  # every target left the data after mining: no quadruplet
            statuses.append((r["key"], r["shard"], "unsafe without admissible targets", None, None))
            continue
        tar, order = run.add(*sample)
        status = "quad" if image or not why else f"quad without its image ({why})"
        statuses.append((r["key"], r["shard"], status, tar, order))
    run.close()
    fetched.close()
    keys, shards, status, tars, orders = (list(c) for c in zip(*statuses)) if statuses else ([],) * 5
    write_piece(task_dir(root, "status", f"{kind}-{g:05d}.parquet"),
                pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shards, pa.int32()),
                          "training": pa.array(status, pa.string()), "tar": pa.array(tars, pa.string()),
                          "order": pa.array(orders, pa.int64())}))  # fmt: skip
    return {"stats": run.stats, "tars": run.index - first_tar + 1, "samples": run.written, **worker_identity()}


def _quad(r: dict, image: bytes | None, req: Requested, fetched: FetchedImages,
          modality: str) -> tuple[dict, str, str] | None:  # fmt: skip
    """A quad sample with its category and difficulty, or None when none of its targets is left."""
    info, asked = req.info, req.asked[r["key"]]
    found = {info["need"][i]: i for i in asked["target"]}
    targets = [(t, x) for t, x in zip(r["targets"], r["similarities"]) if t in found]
    if not targets:
        return None
    pair = None
    if asked["given"]:
        i = asked["given"][0]
        pair = (info["need"][i], info["caption"][i], info["image"][i] or fetched.get(info["need"][i])[0])
    category, difficulty = r["category"] or "unknown", r["difficulty"] or "unknown"
    described = [(t, x, info["caption"][found[t]]) for t, x in targets]
    rows = [found[t] for t, _ in targets]
    sample = quad_sample(r["key"], r["caption"], image, described, req.vectors["text"][rows],
                         req.vectors["image_vector"][rows], pair, category, difficulty, modality)  # fmt: skip
    return sample, category, difficulty
