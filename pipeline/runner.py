"""The runner: decides which stages are up to date from fingerprints, then runs the rest, shard by shard.

A stage's fingerprint hashes its result-changing settings, the recipe sections it declares (e.g. ``model``),
facts about its external inputs, its code version and its upstream fingerprints. So a changed stage re-runs
itself and everything after it, never anything before; a batch-size or concurrency change re-runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from pydantic import BaseModel

from saferclip_data.pipeline.errors import ModelIdentityError, UserError
from saferclip_data.pipeline.progress import BuildProgress, StageOutcome
from saferclip_data.pipeline.schema import declared_columns
from saferclip_data.pipeline.stage import ENABLED_STAGES, STAGE_CONFIGS, ShardSpec, Stage
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.pipeline.worker import StageJob

VERSIONED_PACKAGES = ("saferclip-data", "torch", "open_clip_torch", "pyarrow", "ray", "webdataset", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass
class PlannedStage:
    name: str
    cls: type[Stage]
    config: Any
    fingerprint: str
    fingerprint_inputs: dict[str, Any]

    def instance(self, sections: dict[str, Any]) -> Stage:
        return self.cls(self.config, sections)


class Pipeline:
    """A validated recipe bound to a stage registry and a work dir."""

    def __init__(self, recipe: BaseModel, registry: dict[str, type[Stage]], workdir: WorkDir):
        self.recipe = recipe
        self.registry = registry
        self.workdir = workdir
        self.sections = {
            name: getattr(recipe, name)
            for name in type(recipe).model_fields
            if name not in ("stages", "name", "workdir")
        }
        # which stages this recipe runs, for stages with optional upstreams (``Stage.after``) to ask
        configs = {n: self._config_of(n, cls) for n, cls in registry.items()}
        self.sections[ENABLED_STAGES] = tuple(n for n, config in configs.items() if config is not None)
        self.sections[STAGE_CONFIGS] = {n: config for n, config in configs.items() if config is not None}
        self.stages = self._resolve()

    def _config_of(self, name: str, cls: type[Stage]):
        section = getattr(cls, "config_section", None)
        if section:
            return getattr(self.recipe, section)
        return getattr(self.recipe.stages, name, None)

    def _resolve(self) -> list[PlannedStage]:
        planned: list[PlannedStage] = []
        fingerprints: dict[str, str] = {}
        for name, cls in self.registry.items():
            config = self._config_of(name, cls)
            if config is None:
                continue
            for upstream in cls.inputs:
                if upstream not in fingerprints:
                    raise UserError(f"stages.{name} needs stage '{upstream}', which this recipe does not enable")
            configs = {n: self._config_of(n, c) for n, c in self.registry.items()}
            problem = cls.check_recipe(config, {n: c for n, c in configs.items() if c is not None})
            if problem:
                raise UserError(problem)
            stage = cls(config, self.sections)
            inputs = {
                "stage": name,
                "version": cls.version,
                "config": config.fingerprint_dict(),
                "sections": {s: _dump(self.sections.get(s)) for s in cls.recipe_sections},
                "external": stage.input_fingerprint(self.workdir),
                "upstream": {u: fingerprints[u] for u in (*cls.inputs, *cls.after) if u in fingerprints},
            }
            digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
            fingerprints[name] = digest
            planned.append(PlannedStage(name, cls, config, digest, inputs))
        return planned

    # ---- plan / status -----------------------------------------------------------------------------------
    def plan_rows(self) -> list[dict[str, Any]]:
        rows = []
        for p in self.stages:
            state = self.workdir.state(p.name, p.fingerprint)
            manifest = self.workdir.manifest(p.name) or {}
            shards = manifest.get("shards", [])
            done = sum(self.workdir.shard_done(p.name, s) for s in shards) if state == "partial" else None
            if state == "partial":
                state = f"partial ({done}/{len(shards)} shards)"
            elif state == "stale":
                state = "stale: settings changed, will re-run"
            rows.append(
                {
                    "stage": p.name,
                    "mode": p.cls.mode,
                    "inputs": ", ".join(p.cls.inputs) or "(external)",
                    "resources": p.instance(self.sections).describe_resources(),
                    "fingerprint": p.fingerprint[:12],
                    "state": state,
                }
            )
        return rows

    # ---- build -------------------------------------------------------------------------------------------
    def build(self, executor, progress: BuildProgress) -> list[StageOutcome]:
        outcomes: list[StageOutcome] = []
        rerun_downstream = False
        for planned in self.stages:
            state = self.workdir.state(planned.name, planned.fingerprint)
            if state == "done" and not rerun_downstream:
                manifest = self.workdir.manifest(planned.name)
                counts = manifest.get("counts", {})
                outcomes.append(
                    StageOutcome(
                        planned.name,
                        "up to date",
                        len(manifest["shards"]),
                        0,
                        counts.get("in", 0),
                        counts.get("out", 0),
                        counts.get("rejected", 0),
                        0.0,
                    )
                )
                continue
            rerun_downstream = True
            outcomes.append(self._run_stage(planned, state, executor, progress))
        return outcomes

    def _run_stage(self, planned: PlannedStage, state: str, executor, progress: BuildProgress) -> StageOutcome:
        """Open (or resume) the stage's manifest, run its prepare step, then its one global task or its shards."""
        started = time.perf_counter()
        progress.begin(planned.name)
        stage = planned.instance(self.sections)
        stage.task_map = executor.map  # planning and a prepare step may fan out over the cluster too
        manifest = self._open_manifest(planned, stage, state)
        self.workdir.pull_all()  # a bucket's work dir: what earlier runs or other nodes wrote, read by path below
        stage.prepare(progress, self.workdir)
        self.workdir.publish(planned.name)  # what prepare wrote outside the atomic writes, for workers elsewhere
        job = StageJob(planned.cls, planned.config, self.sections, self.workdir.location)
        run = self._run_global if stage.mode == "global" else self._run_map
        return run(planned, stage, job, manifest, executor, progress, started)

    def _open_manifest(self, planned: PlannedStage, stage: Stage, state: str) -> dict:
        """A partial stage keeps its manifest (and its finished shards); any other starts afresh with its shards
        planned, so a resumed run works on exactly the shards the first one planned."""
        name, wd = planned.name, self.workdir
        if state in ("stale", "done"):
            wd.reset_stage(name)
        manifest = wd.manifest(name) if state == "partial" else None
        if manifest is not None:
            wd.clean_temp_files(name)
            return manifest
        specs = stage.plan_shards(wd) if stage.mode == "map" else []
        manifest = {
            "stage": name,
            "recipe": getattr(self.recipe, "name", None),
            "fingerprint": planned.fingerprint,
            "fingerprint_inputs": planned.fingerprint_inputs,
            "complete": False,
            "mode": stage.mode,
            "shards": [s.shard_id for s in specs],
            "specs": [s.payload for s in specs],
        }
        schema = stage.output_schema()
        if schema is not None:
            manifest["schema"] = declared_columns(schema)
        if stage.mode == "map" and not specs:
            raise UserError(f"stage '{name}': no input shards (is the source empty?)")
        wd.write_manifest(name, manifest)
        return manifest

    def _run_global(self, planned: PlannedStage, stage: Stage, job: StageJob, manifest: dict, executor,
                    progress: BuildProgress, started: float) -> StageOutcome:  # fmt: skip
        name, wd = planned.name, self.workdir
        progress.start_stage(name, None, 0, 1)
        result = executor.run_global(job)
        progress.global_done(result["counts"].get("in", 0))
        progress.finish_stage()
        reasons, partial = Counter(), Counter()
        for shard in result.get("shards", []):
            stats = wd.shard_stats(name, shard) or {}
            reasons.update(stats.get("rejects_by_reason", {}))
            partial.update(stats.get("partial_by_reason", {}))
        manifest.update(
            complete=True,
            shards=result.get("shards", []),
            specs=[{} for _ in result.get("shards", [])],
            rejects_by_reason=dict(sorted(reasons.items())),
            partial_by_reason=dict(sorted(partial.items())),
            counts=result["counts"],
            metadata=result["metadata"],
            seconds=round(time.perf_counter() - started, 3),
            packages=package_versions(),
        )
        wd.publish(name)  # before the manifest that says the stage is complete
        wd.write_manifest(name, manifest)
        counts = result["counts"]
        return StageOutcome(name, "ran", 1, 1, counts.get("in", 0), counts.get("out", 0), counts.get("rejected", 0),
                            manifest["seconds"])  # fmt: skip

    def _run_map(self, planned: PlannedStage, stage: Stage, job: StageJob, manifest: dict, executor,
                 progress: BuildProgress, started: float) -> StageOutcome:  # fmt: skip
        """The shards not yet done, then the stage's finalize step and its manifest from the shards' stats."""
        name, wd = planned.name, self.workdir
        specs = [ShardSpec(s, p) for s, p in zip(manifest["shards"], manifest["specs"])]
        pending = [s for s in specs if not wd.shard_done(name, s.shard_id)]
        total_records = self._expected_records(planned, specs)
        progress.start_stage(name, total_records, len(specs) - len(pending), len(specs))
        pending_ids = {s.shard_id for s in pending}
        already = sum(
            (wd.shard_stats(name, s.shard_id) or {}).get("in", 0) for s in specs if s.shard_id not in pending_ids
        )
        if already:
            progress.advance(already)
        if pending:
            executor.run_map(job, pending, progress.advance, progress.shard_done)
        progress.finish_stage()

        stage.finalize(wd, [s.shard_id for s in specs])
        stats = [wd.shard_stats(name, s.shard_id) for s in specs]
        counts = {k: sum(s[k] for s in stats) for k in ("in", "out", "rejected")}
        if any(s.get("partial") for s in stats):
            counts["partial"] = sum(s.get("partial", 0) for s in stats)
        reasons: Counter = Counter()
        for s in stats:
            reasons.update(s.get("rejects_by_reason", {}))
        manifest.update(
            complete=True,
            counts=counts,
            rejects_by_reason=dict(sorted(reasons.items())),
            metadata=_single_metadata(name, stats),
            seconds=round(time.perf_counter() - started, 3),
            shard_seconds=round(sum(s["seconds"] for s in stats), 3),
            executor=executor.name,
            packages=package_versions(),
        )
        wd.publish(name)
        wd.write_manifest(name, manifest)
        status = "resumed" if len(pending) < len(specs) else "ran"
        return StageOutcome(
            name, status, len(specs), len(pending), counts["in"], counts["out"], counts["rejected"], manifest["seconds"]
        )

    def _expected_records(self, planned: PlannedStage, specs: list[ShardSpec]) -> int | None:
        rows = [s.payload.get("rows") for s in specs]
        if rows and all(r is not None for r in rows):
            return int(sum(rows))
        if planned.cls.inputs:
            upstream = next(iter(planned.cls.inputs))
            total = 0
            for s in specs:
                st = self.workdir.shard_stats(upstream, s.shard_id)
                if st is None:
                    return None
                total += st["out"]
            return total
        return None


def _single_metadata(stage: str, stats: list[dict[str, Any]]) -> dict[str, str]:
    """All shards of a stage must agree on their metadata (e.g. the embedding model identity)."""
    seen = {json.dumps(s.get("metadata", {}), sort_keys=True) for s in stats}
    if len(seen) > 1:
        raise ModelIdentityError(
            f"stage '{stage}': shards were written with different settings or models: {sorted(seen)}"
        )
    return stats[0].get("metadata", {}) if stats else {}


def _dump(section: Any) -> Any:
    return section.model_dump(mode="json") if isinstance(section, BaseModel) else section
