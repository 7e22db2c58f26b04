"""The shards stage: the only stage that writes training tars.

Selection happens first and is written as an id list (``shards/selection.parquet``: key, kind, shuffled order,
tar); then the tars are materialised from it. Two views:

- ``quad/quad-000000.tar``: one sample per unsafe training record — ``unsafe.jpg``/``unsafe.txt``, the given safe
  pair as ``safe.jpg``/``safe.txt`` (when the source gave one), the frozen embeddings of its mined targets
  (``targets_text.npy``, ``targets_image.npy``: k × dim, float16, best first) and ``json`` (category,
  difficulty, target keys, ranks, similarities and captions), so the trainer needs no random access.
- ``plain/plain-000000.tar``: the safe training records as ``jpg`` + ``txt``, which open_clip's own WebDataset
  training loader reads unchanged.

Each folder has ``sizes.json`` (open_clip's loader reads it) and ``stats.json`` (per tar: samples, bytes,
sha256, categories, difficulties). Keys are dot-free, a sample's members are contiguous, order is a seeded hash
shuffle (same seed, same bytes). Records of benchmark splits (``held_out``) never enter a tar; every record keeps
a ``training`` status in the stage output saying where it went and why.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import ENABLED_STAGES, GlobalContext, Stage, StageConfig
from saferclip_data.pipeline.workdir import atomic_path
from saferclip_data.stages.samples import image_extension, quad_sample, sha256_file, source_tables
from saferclip_data.stages.score import column_suffix, unit_rows

#: auto's switch to the task-parallel writer (records in the stage's input)
TASKS_MIN_ROWS = 200_000
#: tars per group of the task-parallel writer (a group is one task)
TARS_PER_GROUP = 8


class ShardsConfig(StageConfig):
    modality: str = Field(
        default="text", pattern="^(text|image|text-image|image-text)$", description="whose mined targets to ship"
    )
    samples_per_shard: int = Field(default=1000, gt=0, description="target samples per tar")
    seed: int = Field(default=0, description="seed of the deterministic shuffle")
    exclude_splits: list[str] = Field(default_factory=list, description="further splits kept out of training")
    split_column: str = "split"
    plain_view: bool = Field(default=True, description="also write safe records as jpg+txt for open_clip")
    method: Literal["auto", "memory", "tasks"] | None = Field(
        default=None,
        description="memory = one process holds the selection and writes every tar; tasks = per-shard planning, "
        "a hash join for targets and each group of tars written by its own task (images fetched by URL for the "
        f"selected records only); unset = auto: tasks above {TASKS_MIN_ROWS:,} records or for a source of URLs",
    )


def shuffle_order(keys: list[str], seed: int) -> list[int]:
    """Row indices in a seeded, key-determined order: stable under re-runs and independent of input order."""
    digests = [hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], keys[i]))


class SpilledImages:
    """The image bytes of ``keys``, copied once from the source shards into one file and read back by offset
    (memory-mapped), so writing the tars holds one source shard at a time instead of every selected image (a
    LAION-sized selection does not fit in memory; the tars are written in shuffled order, which needs random
    access). ``in`` and ``[key]`` as a dict; close() deletes the file."""

    def __init__(self, path: Path, workdir: Any, keys: set[str]):
        import mmap

        self.path, self.offsets = path, {}
        with open(path, "wb") as spill:
            for table in source_tables(workdir, keys, ["key", "image"]):
                for key, image in zip(table["key"].to_pylist(), table["image"].to_pylist()):
                    if image:
                        self.offsets[key] = (spill.tell(), len(image))
                        spill.write(image)
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def __getitem__(self, key: str) -> bytes:
        start, length = self.offsets[key]
        return self._map[start : start + length]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()
        self.path.unlink(missing_ok=True)


class ShardsStage(Stage):
    name = "shards"
    Config = ShardsConfig
    mode = "global"
    inputs = {
        "mine": ("key", "role", "category", "given_pair"),
        "embed": ("key", "image_embedding", "text_embedding"),
    }
    after = ("benchmark",)  # when the recipe draws a benchmark, its records never enter a tar
    output_columns = ("key", "role", "training", "tar")
    version = "1"

    config: ShardsConfig

    @classmethod
    def check_recipe(cls, config: StageConfig, stages: dict[str, StageConfig]) -> str | None:
        mined = getattr(stages.get("neighbours"), "modalities", None)
        if mined is not None and config.modality not in mined:
            return (f"stages.shards.modality: '{config.modality}' targets are not mined "
                    f"(stages.neighbours.modalities: {', '.join(mined)})")  # fmt: skip
        return None

    def run_global(self, ctx: GlobalContext) -> dict[str, int]:
        c = self.config
        wd = ctx.workdir
        m = column_suffix(c.modality)
        with_benchmark = "benchmark" in self.sections.get(ENABLED_STAGES, ())
        first = "benchmark" if with_benchmark else "mine"
        shard_ids = wd.completed_shards(first)
        mine_cols = (f"{m}_targets", f"{m}_similarities", f"{m}_difficulty")
        if f"{m}_targets" not in wd.shard_columns("mine", shard_ids[0]):
            raise UserError(f"stages.shards.modality: mine has no '{c.modality}' targets (add it to neighbours)")
        inputs = {
            "mine": ("key", "role", "category", "given_pair", *mine_cols),
            "embed": self.inputs["embed"],
            "source": ("key", "caption", c.split_column),
        }
        if with_benchmark:
            inputs = {"benchmark": ("key", "benchmark_id", "held_out"), **inputs}
        if self._use_tasks(wd, shard_ids, first):
            return self._run_tasks(ctx, shard_ids, first, inputs, with_benchmark)
        tables = [wd.read_aligned(s, inputs) for s in shard_ids]
        table = pa.concat_tables(tables)
        if c.split_column not in table.column_names:
            raise UserError(f"stages.shards: the source has no column '{c.split_column}' (set split_column)")
        keys, roles = table["key"].to_pylist(), table["role"].to_pylist()
        held = table["held_out"].to_pylist() if with_benchmark else [False] * len(keys)
        splits = table[c.split_column].to_pylist()
        excluded = set(c.exclude_splits)
        has_image = table["image_embedding"].is_valid().to_pylist()
        row_of = {k: i for i, k in enumerate(keys)}
        # a target from a held-out or excluded split would leak it into training: such targets are dropped
        admissible = [not held[i] and splits[i] not in excluded for i in range(len(keys))]
        sims = table[f"{m}_similarities"].to_pylist()
        self.targets: list[list[tuple[str, float]]] = [
            [(t, s) for t, s in zip(ts or [], ss or []) if t in row_of and admissible[row_of[t]]]
            for ts, ss in zip(table[f"{m}_targets"].to_pylist(), sims)
        ]
        status: list[str] = []
        for i in range(len(keys)):
            if held[i]:
                status.append("held out for the benchmark")
            elif splits[i] in excluded:
                status.append(f"split {splits[i]} excluded")
            elif roles[i] == "unsafe":
                status.append("quad" if self.targets[i] else "unsafe without admissible targets")
            elif not c.plain_view:
                status.append("safe (plain view off)")
            else:
                status.append("plain" if has_image[i] else "safe without image (not in the plain view)")
        folder = wd.stage_dir(self.name)
        tar_of: list[str | None] = [None] * len(keys)
        selection = []
        for kind in ("quad", "plain"):
            rows = [i for i in shuffle_order(keys, c.seed) if status[i] == kind]
            for n, i in enumerate(rows):
                tar_of[i] = f"{kind}/{kind}-{n // c.samples_per_shard:06d}.tar"
                selection.append({"key": keys[i], "kind": kind, "order": n, "tar": tar_of[i]})
        ctx.write_table("selection", pa.Table.from_pylist(selection) if selection else pa.table({}))
        self._materialise(ctx, folder, table, selection)
        start = 0
        for shard_id, shard in zip(shard_ids, tables):
            span = slice(start, start + shard.num_rows)
            start += shard.num_rows
            part = pa.table(
                {
                    "key": shard["key"],
                    "role": shard["role"],
                    "training": pa.array(status[span], pa.string()),
                    "tar": pa.array(tar_of[span], pa.string()),
                }
            )
            ctx.write_shard(shard_id, part, [], shard.num_rows)
        self.counts = dict(Counter(status))
        return {"in": len(keys), "out": len(keys), "rejected": 0}

    def _use_tasks(self, wd, shard_ids: list[str], first: str) -> bool:
        method = self.config.method or "auto"
        if method != "auto":
            return method == "tasks"
        source = self.sections.get("source")
        records = sum((wd.shard_stats(first, s) or {}).get("out", 0) for s in shard_ids)
        return records > TASKS_MIN_ROWS or getattr(source, "kind", None) == "embeddings"

    def _run_tasks(self, ctx: GlobalContext, shard_ids: list[str], first: str, inputs: dict,
                   with_benchmark: bool) -> dict[str, int]:  # fmt: skip
        from saferclip_data.stages.download import DownloadOptions
        from saferclip_data.stages.shards_scaled import run_tasks

        c = self.config
        records = sum((ctx.workdir.shard_stats(first, s) or {}).get("out", 0) for s in shard_ids)
        groups = max(1, -(-records // (c.samples_per_shard * TARS_PER_GROUP)))
        source_cols = ctx.workdir.shard_columns("source", shard_ids[0])
        extra = ("image", "url") if "url" in source_cols else ("image",)
        inputs = {**inputs, "source": (*inputs["source"], *extra)}
        settings = {"m": column_suffix(c.modality), "with_benchmark": with_benchmark, "split_column": c.split_column,
                    "excluded": list(c.exclude_splits), "plain_view": c.plain_view, "seed": c.seed,
                    "groups": {"quad": groups, "plain": groups}, "samples_per_shard": c.samples_per_shard,
                    "modality": c.modality}  # fmt: skip
        options = getattr(self.sections.get("source"), "download", None) or DownloadOptions()
        result = run_tasks(ctx, shard_ids, inputs, settings, options)
        self.counts = result["training"]
        return result["counts"]

    def _materialise(self, ctx: GlobalContext, folder: Path, table: pa.Table, selection: list[dict]) -> None:
        """Write the tars listed in the selection, with the images and frozen target embeddings they need."""
        c = self.config
        m = column_suffix(c.modality)
        row_of = {k: i for i, k in enumerate(table["key"].to_pylist())}
        dim = table.schema.field("text_embedding").type.list_size
        vectors = {mod: unit_rows(table[f"{mod}_embedding"], dim)[0].astype(np.float16) for mod in ("image", "text")}
        self._captions = table["caption"].to_pylist()
        # python lists once: per-row pyarrow scalar access in the sample loop costs more than the tar writing
        self._columns = {c: table[c].to_pylist() for c in ("key", "given_pair", "category", f"{m}_difficulty")}
        needed = {s["key"] for s in selection}
        given = table["given_pair"].to_pylist()
        needed |= {given[row_of[s["key"]]] for s in selection if s["kind"] == "quad"} - {None}
        folder.mkdir(parents=True, exist_ok=True)
        # named like the work dir's temporary files, so that a crashed run's spill is cleaned when the stage reruns
        images = SpilledImages(folder / f".images.spill.tmp-{os.getpid()}", ctx.workdir, needed)
        try:
            self._write_tars(folder, selection, table, row_of, vectors, images)
        finally:
            images.close()

    def _write_tars(self, folder: Path, selection: list[dict], table: pa.Table, row_of: dict[str, int],
                    vectors: dict[str, np.ndarray], images: SpilledImages) -> None:  # fmt: skip
        """Each tar of the selection, written whole to a temporary name and renamed; sizes.json, stats.json."""
        import webdataset as wds

        c = self.config
        m = column_suffix(c.modality)
        captions = self._captions
        by_tar: dict[str, list[dict]] = {}
        for s in selection:
            by_tar.setdefault(s["tar"], []).append(s)
        stats: dict[str, dict[str, dict]] = {"quad": {}, "plain": {}}
        for tar, samples in sorted(by_tar.items()):
            kind = samples[0]["kind"]
            path = folder / tar
            path.parent.mkdir(parents=True, exist_ok=True)
            categories: Counter = Counter()
            difficulties: Counter = Counter()
            with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=0, user="saferclip", group="saferclip",
                                                         mode=0o444) as writer:  # fmt: skip
                for s in samples:
                    i = row_of[s["key"]]
                    if kind == "plain":
                        image = images[s["key"]]
                        writer.write({"__key__": s["key"], image_extension(image): image, "txt": captions[i]})
                        continue
                    sample, category, difficulty = self._quad_sample(table, i, row_of, vectors, images, m)
                    writer.write(sample)
                    categories[category] += 1
                    difficulties[difficulty] += 1
            stats[kind][path.name] = {
                "samples": len(samples),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                **({"categories": dict(sorted(categories.items())), "difficulty": dict(sorted(difficulties.items()))}
                   if kind == "quad" else {}),
            }  # fmt: skip
        for kind, per_tar in stats.items():
            if per_tar:
                sizes = {name: s["samples"] for name, s in per_tar.items()}
                (folder / kind / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
                (folder / kind / "stats.json").write_text(json.dumps(per_tar, indent=2) + "\n")

    def _quad_sample(self, table, i, row_of, vectors, images, m) -> tuple[dict, str, str]:
        captions, columns = self._captions, self._columns
        key = columns["key"][i]
        given = columns["given_pair"][i]
        category = columns["category"][i] or "unknown"
        difficulty = columns[f"{m}_difficulty"][i] or "unknown"
        rows = [row_of[t] for t, _ in self.targets[i]]
        targets = [(t, s, captions[row_of[t]]) for t, s in self.targets[i]]
        pair = None
        if given in row_of:  # the given partner survived filter and dedup
            pair = (given, captions[row_of[given]], images[given] if given in images else None)
        sample = quad_sample(key, captions[i], images[key] if key in images else None, targets,
                             vectors["text"][rows], vectors["image"][rows], pair, category, difficulty,
                             self.config.modality)  # fmt: skip
        return sample, category, difficulty

    def output_metadata(self) -> dict[str, str]:
        counts = getattr(self, "counts", None)
        return {"training": json.dumps(counts, sort_keys=True)} if counts else {}
