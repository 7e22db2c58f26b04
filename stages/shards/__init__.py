"""The shards stage: the only stage that writes training tars.

Two views:

- ``quad/quad-000000.tar``: one sample per unsafe training record — ``unsafe.jpg``/``unsafe.txt``, the given safe
  pair as ``safe.jpg``/``safe.txt`` (when the source gave one), the frozen embeddings of its mined targets
  (``targets_text.npy``, ``targets_image.npy``: k × dim, float16, best first) and ``json`` (category,
  difficulty, target keys, ranks, similarities and captions), so the trainer needs no random access.
- ``plain/plain-000000.tar``: the safe training records as ``jpg`` + ``txt``, which open_clip's own WebDataset
  training loader reads unchanged.

Each folder has ``sizes.json`` (open_clip's loader reads it) and ``stats.json`` (per tar: samples, bytes,
sha256, categories, difficulties); ``selection.parquet`` lists every sample (key, kind, order, tar). Keys are
dot-free, a sample's members are contiguous, order is a seeded hash shuffle (same seed, same bytes). Records of
benchmark splits (``held_out``) never enter a tar; every record keeps a ``training`` status in the stage output
saying where it went and why (a failed image download included).

The steps, each a set of tasks (no process holds the data set, whatever its size):

0. ``blocked_keys`` (per input shard): records that may not be a target (held out, excluded split).
1. ``plan_shard`` (per input shard): statuses, the samples of each (kind, group) and the requests for what a
   quad sample needs from elsewhere, by hash bucket (``shards/plan.py``).
2. ``resolve_bucket`` (per hash bucket): requests joined with the records asked for.
3. ``write_group`` (per kind and group of 8 tars): the group's samples in digest order written as tars
   numbered after the groups before it (``shards/tars.py``).
4. ``output_shard`` (per input shard): the stage output (key, role, training, tar) with each sample's status.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from saferclip_data.pipeline.errors import UserError, missing_extra
from saferclip_data.pipeline.stage import (
    ENABLED_STAGES,
    GlobalContext,
    GlobalOutput,
    Stage,
    StageConfig,
    write_global_shard,
)
from saferclip_data.pipeline.workdir import WorkDir, atomic_path, atomic_write_text, remove_tree
from saferclip_data.stages.columns import column_part, fields, schema
from saferclip_data.stages.shards.plan import BUCKETS, blocked_keys, plan_shard, resolve_bucket, task_dir, write_piece
from saferclip_data.stages.shards.tars import write_group

#: tars per group (a group is one writing task)
TARS_PER_GROUP = 8
SELECTION_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()), ("order", pa.int64()),
                              ("tar", pa.string())])  # fmt: skip


class ShardsConfig(StageConfig):
    modality: str = Field(
        default="text", pattern="^(text|image|text-image|image-text)$", description="whose mined targets to ship"
    )
    samples_per_shard: int = Field(default=1000, gt=0, description="target samples per tar")
    seed: int = Field(default=0, description="seed of the deterministic shuffle")
    exclude_splits: list[str] = Field(default_factory=list, description="further splits kept out of training")
    split_column: str = "split"
    plain_view: bool = Field(default=True, description="also write safe records as jpg+txt for open_clip")


def output_shard(root: str, shard_id: str, index: int, inputs: dict, metadata: dict[str, str]) -> dict[str, Any]:
    """Step 4: the stage output of one input shard, with the final status of its samples."""
    wd = WorkDir(root)
    table = wd.read_aligned(shard_id, inputs)
    plan = pq.read_table(task_dir(root, "plan", f"{index:06d}.parquet"))
    status = dict(zip(plan["key"].to_pylist(), plan["training"].to_pylist()))
    tar: dict[str, str] = {}
    for path in sorted(task_dir(root, "status").glob("*.parquet")):
        for r in pq.read_table(path, filters=[("shard", "=", index)]).to_pylist():
            status[r["key"]], tar[r["key"]] = r["training"], r["tar"]
    keys = table["key"].to_pylist()
    out = pa.table({"key": table["key"], "role": table["role"],
                    "training": pa.array([status[k] for k in keys], pa.string()),
                    "tar": pa.array([tar.get(k) for k in keys], pa.string())})  # fmt: skip
    return write_global_shard(wd, "shards", metadata, shard_id, out, [], len(keys))


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
    version = "2"

    config: ShardsConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields(*self.output_columns))

    @classmethod
    def check_recipe(cls, config: StageConfig, stages: dict[str, StageConfig]) -> str | None:
        mined = getattr(stages.get("neighbours"), "modalities", None)
        if mined is not None and config.modality not in mined:
            return (f"stages.shards.modality: '{config.modality}' targets are not mined "
                    f"(stages.neighbours.modalities: {', '.join(mined)})")  # fmt: skip
        if getattr(stages.get("source"), "kind", None) == "embeddings":  # its images are URLs, fetched here
            problem = missing_extra("img2dataset", "download")
            if problem:
                return f"stages.shards: an embeddings source's images are fetched by URL: {problem}"
        return None

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        from saferclip_data.stages.download import DownloadOptions

        c, wd = self.config, ctx.workdir
        m = column_part(c.modality)
        with_benchmark = "benchmark" in self.sections.get(ENABLED_STAGES, ())
        first = "benchmark" if with_benchmark else "mine"
        shard_ids = wd.completed_shards(first)
        if f"{m}_targets" not in wd.shard_columns("mine", shard_ids[0]):
            raise UserError(f"stages.shards.modality: mine has no '{c.modality}' targets (add it to neighbours)")
        source_cols = wd.shard_columns("source", shard_ids[0])
        if c.split_column not in source_cols:
            raise UserError(f"stages.shards: the source has no column '{c.split_column}' (set split_column)")
        extra = ("image", "url") if "url" in source_cols else ("image",)
        inputs = {"mine": ("key", "role", "category", "given_pair", f"{m}_targets", f"{m}_similarities",
                           f"{m}_difficulty"),
                  "embed": self.inputs["embed"], "source": ("key", "caption", c.split_column, *extra)}  # fmt: skip
        if with_benchmark:
            inputs = {"benchmark": ("key", "benchmark_id", "held_out"), **inputs}
        records = sum((wd.shard_stats(first, s) or {}).get("out", 0) for s in shard_ids)
        groups = max(1, -(-records // (c.samples_per_shard * TARS_PER_GROUP)))
        settings = {"m": m, "with_benchmark": with_benchmark, "split_column": c.split_column,
                    "excluded": list(c.exclude_splits), "plain_view": c.plain_view, "seed": c.seed,
                    "groups": {"quad": groups, "plain": groups}, "samples_per_shard": c.samples_per_shard,
                    "modality": c.modality}  # fmt: skip
        options = getattr(self.sections.get("source"), "download", None) or DownloadOptions()
        return self._run_steps(ctx, shard_ids, inputs, settings, options)

    def _run_steps(self, ctx: GlobalContext, shard_ids: list[str], inputs: dict, s: dict,
                   options: Any) -> GlobalOutput:  # fmt: skip
        """Steps 0-4 (see the module docstring); returns the stage's counts."""
        root = str(ctx.workdir.root)
        remove_tree(task_dir(root))
        task_dir(root).mkdir(parents=True)
        light = {stage: tuple(c for c in cols if c not in ("image_embedding", "text_embedding", "image"))
                 for stage, cols in inputs.items()}  # fmt: skip
        blocked = ctx.map(blocked_keys, [(root, light, sid, s["with_benchmark"], s["split_column"], s["excluded"])
                                         for sid in shard_ids])  # fmt: skip
        s["blocked"] = str(task_dir(root, "blocked.parquet"))
        write_piece(Path(s["blocked"]), pa.table({"key": pa.array([k for keys, _ in blocked for k in keys],
                                                                   pa.string())}))  # fmt: skip
        s["given_pairs"] = any(given for _, given in blocked)
        plans = ctx.map(plan_shard, [(root, inputs, sid, i, s) for i, sid in enumerate(shard_ids)])
        ctx.map(resolve_bucket, [(root, b) for b in range(BUCKETS)])
        groups = [(kind, g) for kind in ("quad", "plain") for g in range(s["groups"][kind])
                  if any(p["counts"].get(f"{kind}-{g}") for p in plans)]  # fmt: skip
        first, tars_so_far = [], {"quad": 0, "plain": 0}
        for kind, g in groups:  # a group's tars follow the previous group's (an upper bound: some images may fail)
            first.append(tars_so_far[kind])
            samples = sum(p["counts"].get(f"{kind}-{g}", 0) for p in plans)
            tars_so_far[kind] += -(-samples // s["samples_per_shard"])
        written = ctx.map(write_group, [(root, kind, g, f, s, options) for (kind, g), f in zip(groups, first)])
        self._write_indexes(ctx, groups, written)
        outputs = ctx.map(output_shard, [(root, sid, i, {k: v for k, v in light.items() if k != "embed"},
                                          {}) for i, sid in enumerate(shard_ids)])  # fmt: skip
        ctx.committed(shard_ids)
        counts: Counter = Counter()
        for sid in shard_ids:
            counts.update(pq.read_table(ctx.workdir.shard_path("shards", sid), columns=["training"])["training"]
                          .to_pylist())  # fmt: skip
        for bulky in ("store", "samples", "resolved", "fetch"):  # copies of the data; plans and statuses stay
            remove_tree(task_dir(root, bulky))
        records = sum(o["in"] for o in outputs)
        # the training statuses are known once every output shard is written: in the manifest, not in the shards
        return GlobalOutput({"in": records, "out": records, "rejected": 0},
                            {"training": json.dumps(dict(counts), sort_keys=True)})

    @staticmethod
    def _write_indexes(ctx: GlobalContext, groups: list[tuple[str, int]], written: list[dict]) -> None:
        """``sizes.json`` and ``stats.json`` per view, and ``selection.parquet`` from the groups' status files."""
        stats: dict[str, dict] = {"quad": {}, "plain": {}}
        for (kind, _), result in zip(groups, written):
            stats[kind].update(result["stats"])
        for kind, per_tar in stats.items():
            if per_tar:
                folder = ctx.workdir.stage_dir("shards") / kind
                sizes = {n: t["samples"] for n, t in sorted(per_tar.items())}
                atomic_write_text(folder / "sizes.json", json.dumps(sizes, indent=2) + "\n")
                atomic_write_text(folder / "stats.json", json.dumps(dict(sorted(per_tar.items())), indent=2) + "\n")
        path = ctx.workdir.stage_dir("shards") / "selection.parquet"
        offsets = {"quad": 0, "plain": 0}
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SELECTION_SCHEMA, compression="zstd") as writer:
            for kind, g in groups:
                part = pq.read_table(task_dir(str(ctx.workdir.root), "status", f"{kind}-{g:05d}.parquet"))
                part = part.filter(pc.is_valid(part["tar"]))
                order = pc.add(part["order"], offsets[kind])
                offsets[kind] += part.num_rows
                writer.write_table(pa.table({"key": part["key"], "kind": pa.array([kind] * part.num_rows, pa.string()),
                                             "order": order, "tar": part["tar"]}, schema=SELECTION_SCHEMA))  # fmt: skip
