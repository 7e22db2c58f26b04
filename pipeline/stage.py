"""The stage contract.

A stage is a small class with a pydantic ``Config``. A *map* stage turns one shard at a time into an output
shard: ``read_shard`` gathers its input columns, ``process_batch`` (the pure core, testable without Ray) maps
an Arrow table to kept rows plus rejects. A *global* stage needs the whole data set at once (index building,
benchmark selection): it gets column access to its upstream stages through a :class:`GlobalContext` and
writes named tables. Either kind declares its resources; ``setup`` runs once per worker, on the worker, so
that device choice (GPU or CPU) is made where the devices are, not on the driver.
"""

from __future__ import annotations

import os
import sys
from abc import ABC
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.workdir import REJECT_SCHEMA

if TYPE_CHECKING:
    from saferclip_data.pipeline.workdir import WorkDir



class StageConfig(BaseModel):
    """Settings every stage has. The resource fields never change results, so they are left out of the
    stage's fingerprint: changing them does not re-run anything."""

    model_config = ConfigDict(extra="forbid")
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "concurrency", "cpus", "gpus"})

    batch_size: int = Field(default=256, gt=0, le=1 << 24, description="records per call of process_batch")
    concurrency: int = Field(default=1, gt=0, le=100_000, description="workers (Ray actors) running this stage at once")
    cpus: float = Field(default=1.0, gt=0, description="CPU cores reserved per worker")
    gpus: float | Literal["auto"] = Field(
        default=0, description="GPUs per worker; 'auto' takes one where the cluster has GPUs"
    )

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that change results (everything but the runtime fields). Unset options (None) are left
        out, so that a release adding an optional setting does not invalidate work dirs that never used it."""
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_FIELDS), exclude_none=True)


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of resume: a shard id plus whatever the stage needs to read it."""

    shard_id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reject:
    """A record a stage did not keep; it keeps its key and a reason, never vanishes."""

    key: str
    reason: str
    error: str = ""


@dataclass
class BatchResult:
    """What ``process_batch`` returns: the rows kept (output columns) and the rows rejected."""

    table: pa.Table
    rejects: list[Reject] = field(default_factory=list)
    #: kept records that lost part of their output (one modality's targets, a classifier's score), with why
    partial: list[Reject] = field(default_factory=list)


@dataclass
class GlobalOutput:
    """What ``run_global`` returns: the stage's counts for the manifest and the metadata its outputs carry (decided
    by the run itself: thresholds, selection sizes), which the runner records in the manifest."""

    counts: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)


def ray_node_id() -> str:
    """The Ray node this process runs on, or "local" outside Ray (ray is not imported just to ask)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


def worker_identity() -> dict[str, Any]:
    """Which process and node ran a piece of work (for shard markers)."""
    return {"pid": os.getpid(), "node": ray_node_id()}


def finished(result: BatchResult | Callable[[], BatchResult]) -> BatchResult:
    """A ``compute_batch`` result, finished if it was handed back as a function."""
    return result if isinstance(result, BatchResult) else result()


def rejects_table(stage: str, rejects: Iterable[Reject]) -> pa.Table:
    rows = list(rejects)
    return pa.table(
        {
            "key": [r.key for r in rows],
            "stage": [stage] * len(rows),
            "reason": [r.reason for r in rows],
            "error": [r.error for r in rows],
        },
        schema=REJECT_SCHEMA,
    )


#: ``GlobalContext.map``'s engine: (function, argument tuples, CPUs per task) -> results in argument order
TaskMap = Callable[[Callable[..., Any], list[tuple], float], list[Any]]


def serial_map(fn: Callable[..., Any], items: list[tuple], cpus: float = 1.0) -> list[Any]:
    """Run the tasks one after another in this process (the local executor)."""
    return [fn(*args) for args in items]


#: key of the recipe's file-system options in the sections (see :mod:`storage`; never written anywhere)
STORAGE_OPTIONS = "storage_options"
#: key of the tuple of stage names the recipe enables, in the sections every stage receives
ENABLED_STAGES = "enabled_stages"
#: key of every enabled stage's config by name, in the sections (what a stage's output schema may depend on:
#: the modalities neighbours mines, the categories score writes)
STAGE_CONFIGS = "stage_configs"


class Stage(ABC):
    """Base class of all stages. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    mode: ClassVar[Literal["map", "global"]] = "map"
    #: upstream stage name -> columns this stage reads from it (the first entry drives the shard list)
    inputs: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: stages this one reads when the recipe enables them (optional upstreams): their changes re-run it too
    after: ClassVar[tuple[str, ...]] = ()
    #: output column names, for the plan and for downstream validation
    output_columns: ClassVar[tuple[str, ...]] = ()
    #: top-level recipe sections (e.g. "model") whose content belongs to this stage's fingerprint
    recipe_sections: ClassVar[tuple[str, ...]] = ()
    #: bump when the stage's code changes its results, so old outputs are invalidated
    version: ClassVar[str] = "1"
    #: where the config lives in the recipe: None = ``stages.<name>``, else a top-level key (e.g. "source")
    config_section: ClassVar[str | None] = None

    def __init__(self, config: StageConfig, sections: dict[str, Any]):
        self.config = config
        self.sections = sections
        self.task_map: TaskMap = serial_map
        storage.configure(sections.get(STORAGE_OPTIONS))  # the driver and every worker read with the recipe's

    # ---- driver side -------------------------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, config: StageConfig, stages: dict[str, StageConfig]) -> str | None:
        """A problem between this stage's settings and the other stages' (``stages``: every enabled stage's
        config by name), as one line naming the key path, or None. Runs at ``validate``, before any work."""
        return None

    def input_fingerprint(self, workdir: WorkDir) -> dict[str, Any]:
        """Facts about external inputs (files, sizes, times; state a stage keeps in the work dir, such as which
        download attempt is due) that belong to the fingerprint; none by default."""
        return {}

    def plan_shards(self, workdir: WorkDir) -> list[ShardSpec]:
        """The shards to produce. By default one per shard of the first upstream stage."""
        upstream = next(iter(self.inputs))
        return [ShardSpec(s) for s in workdir.completed_shards(upstream)]

    def prepare(self, progress: Any, workdir: WorkDir) -> None:
        """Driver-side, once per build (and per resume) before the stage's workers start: make sure a cached
        model exists, build a shared index, ... ``progress.subtask(name, total)`` returns a callable that
        advances a progress bar; ``self.task_map`` runs tasks on the build's executor (see
        ``GlobalContext.map``), so that a shared index is built from per-shard work, not in the driver."""

    def describe_resources(self) -> str:
        c = self.config
        return f"cpus={c.cpus:g} gpus={c.gpus} batch={c.batch_size or 'by device'} concurrency={c.concurrency}"

    # ---- worker side -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Runs once per worker before any shard (model load, device choice)."""

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        """Assemble this shard's input: the declared columns of each upstream stage, aligned on ``key``."""
        return workdir.read_aligned(spec.shard_id, self.inputs)

    def batch_rows(self) -> int:
        """Records per ``process_batch`` call on this worker (after ``setup``): the config's ``batch_size``; a
        stage may choose by the device it found."""
        return self.config.batch_size

    def process_batch(self, batch: pa.Table) -> BatchResult:
        """The pure core of a map stage. A stage that splits its work (``prefetch``) need not override it."""
        if not self.prefetch:
            raise NotImplementedError(f"stage {self.name} has no process_batch")
        return finished(self.compute_batch(self.prepare_batch(batch)))

    #: the worker runs ``prepare_batch`` of the next batch in a background thread while ``compute_batch`` of
    #: the current one runs, so host work (decoding, tokenising, uploading) hides behind the device's
    prefetch: ClassVar[bool] = False

    def prepare_batch(self, batch: pa.Table) -> Any:
        """First half of ``process_batch`` (``prefetch`` stages): whatever can run ahead of the compute."""
        raise NotImplementedError(f"stage {self.name} has no prepare_batch")

    def compute_batch(self, prepared: Any) -> BatchResult | Callable[[], BatchResult]:
        """Second half of ``process_batch`` (``prefetch`` stages): from what ``prepare_batch`` returned. It may
        return a function that finishes the result instead (waits for the device, builds the table): the worker
        calls it only after starting the next batch's compute, so an accelerator is not left idle while the
        host turns one batch's output into Arrow and launches the next."""
        raise NotImplementedError(f"stage {self.name} has no compute_batch")

    def finalize(self, workdir: WorkDir, shard_ids: list[str]) -> None:
        """Driver-side check over the finished shards (e.g. key uniqueness); raise to keep the stage open."""

    def output_metadata(self) -> dict[str, str]:
        """Key/values stored in every output file's schema metadata and in the stage manifest."""
        return {}

    def output_schema(self) -> pa.Schema | None:
        """The columns (and types) of this stage's output shards for this recipe; the engine checks every shard
        against it (see :mod:`saferclip_data.pipeline.schema`). None: not declared, not checked."""
        return None

    def run_global(self, ctx: GlobalContext) -> GlobalOutput:
        """The core of a global stage: its steps, run through ``ctx``; returns its counts and output metadata."""
        raise NotImplementedError(f"stage {self.name} has no run_global")


class GlobalContext:
    """What a whole-data-set stage's steps run through: ``map`` fans a step out as tasks (in-process, or on the
    cluster when the build runs on Ray), ``write_table`` writes a named table, ``committed`` records the output
    shards the tasks wrote. No process holds the data set: data travels between steps through the work dir."""

    def __init__(self, stage: Stage, workdir: WorkDir, task_map: TaskMap = serial_map):
        self.stage, self.workdir = stage, workdir
        self.shards: list[str] = []
        self._task_map = task_map

    def map(self, fn: Callable[..., Any], items: list[tuple], cpus: float = 1.0) -> list[Any]:
        """``fn(*args)`` for every argument tuple, on the cluster's workers when the build runs on Ray (spread
        over the nodes, a bounded number in flight), else here one after another. ``fn`` must be a module-level
        function whose arguments and result are small (paths, ids, counts): data travels through the work dir."""
        return self._task_map(fn, items, cpus)

    def write_table(self, name: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        """A named table of the stage (``<stage>/<name>.parquet``), with the output metadata given."""
        self.workdir.write_table(self.stage.name, name, table, metadata or {})

    def committed(self, shard_ids: Iterable[str]) -> None:
        """Record shards that tasks of this stage wrote with :func:`write_global_shard`, in output order."""
        self.shards.extend(shard_ids)


def write_global_shard(
    workdir: WorkDir,
    stage: str,
    metadata: dict[str, str],
    shard_id: str,
    table: pa.Table,
    rejects: list[Reject],
    records_in: int,
    worker: dict[str, Any] | None = None,
    partial: list[Reject] = (),
) -> dict[str, Any]:
    """One output shard of a global stage with its marker, from whichever process computed it (named in the
    marker: ``worker``, by default the calling process and its node). Every record in must be kept or rejected;
    ``partial`` lists kept records that lost part of their output (their key and why, beside the rejects).
    Returns the marker's stats."""
    if table.num_rows + len(rejects) != records_in:
        raise RuntimeError(
            f"stage {stage} shard {shard_id}: {records_in} records in, {table.num_rows} kept "
            f"+ {len(rejects)} rejected; every record must be kept or rejected"
        )
    stats = {
        "shard": shard_id,
        "in": records_in,
        "out": table.num_rows,
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "seconds": 0.0,
        "metadata": metadata,
    }
    stats["worker"] = worker or worker_identity()
    stats |= partial_stats(partial)
    workdir.write_shard(stage, shard_id, table, rejects_table(stage, rejects), stats, metadata,
                        rejects_table(stage, partial) if partial else None)  # fmt: skip
    return stats


def partial_stats(partial: list[Reject]) -> dict[str, Any]:
    """The marker's count of kept records that lost part of their output, by reason (nothing when none did)."""
    if not partial:
        return {}
    return {"partial": len(partial), "partial_by_reason": dict(sorted(Counter(r.reason for r in partial).items()))}
