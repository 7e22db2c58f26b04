"""A map stage's worker: runs shards of one stage in whatever process it lives in (the driver, or a Ray actor),
batch by batch through the stage's pure core, with the next shard read and the last one written behind."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa

from saferclip_data.pipeline.stage import (
    BatchResult,
    ShardSpec,
    Stage,
    StageConfig,
    finished,
    partial_stats,
    ray_node_id,
    rejects_table,
)
from saferclip_data.pipeline.workdir import WorkDir


@dataclass
class StageJob:
    """Everything a worker needs to run a stage, small and picklable (no data, no model)."""

    stage_cls: type[Stage]
    config: StageConfig
    sections: dict[str, Any]
    workdir: str
    torch_threads: int | None = None
    #: where a global stage's ``GlobalContext.map`` tasks run: "ray" (the cluster) or "local" (in-process)
    executor: str = "local"


class ShardWorker:
    """Runs shards of one map stage in whatever process it lives in (the driver, or a Ray actor)."""

    def __init__(self, job: StageJob):
        if job.torch_threads:
            import torch

            torch.set_num_threads(job.torch_threads)
        self.job = job
        self.stage = job.stage_cls(job.config, job.sections)
        self.workdir = WorkDir(job.workdir)
        # a bucket's work dir: what the stage's prepare step wrote (read by path), in this node's mirror; input
        # shards are fetched one by one as they are read
        self.workdir.pull(self.stage.name)
        self.stage.setup()
        self.node = ray_node_id()
        #: a prefetch stage's background threads: the next batch's preparation and the look-ahead's first batch
        #: (prepared while this shard's last batch computes); the next shard's read, from this shard's start
        #: (reading a shard of encoded images takes longer than a batch computes on a GPU)
        self._pool = self._reader = None
        if self.stage.prefetch:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage.name}-prefetch")
            self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage.name}-reader")
        self._ahead: tuple[str, Future] | None = None
        #: a shard is written on this thread while the next shard computes (a device does not wait for the
        #: parquet write; the source stage's reading overlaps its image writes); its stats come back once it is
        #: on disk (``run_shard``, ``drain``). One write waits at a time, so a worker holds one more shard output.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage.name}-writer")
        self._writing: tuple[dict[str, Any], Future] | None = None

    def ready(self) -> dict[str, str]:
        return {"pid": str(os.getpid()), **self.stage.output_metadata()}

    def run_shard(
        self, spec: ShardSpec, on_batch: Callable[[int], None] | None = None, upcoming: ShardSpec | None = None
    ) -> list[dict[str, Any]]:
        """Run one shard and write its output behind; returns the stats of the shards this call committed
        (output and marker on disk): the previous one, written while this one computed (this one is committed by
        the next call or :meth:`drain`). ``upcoming``: the shard this worker will be given next; a prefetch
        stage reads it while this shard computes and prepares its first batch while this shard's last batch
        computes, so the device does not wait between shards (a shard that is not the announced one is read
        as usual)."""
        started, started_at = time.perf_counter(), time.time()
        stage = self.stage
        table, first = self._take_look_ahead(spec)
        if table is None:
            table = stage.read_shard(spec, self.workdir)
        batch_size = stage.batch_rows()
        outputs: list[pa.Table] = []
        rejects, partly = [], []
        starts = range(0, table.num_rows, batch_size) if table.num_rows else [0]
        batches = [table.slice(start, batch_size) for start in starts]
        look_ahead = None
        if upcoming is not None and self._reader is not None:
            reading = self._reader.submit(stage.read_shard, upcoming, self.workdir)
            look_ahead = partial(self._look_ahead, upcoming, reading)
        for batch, result in batch_results(stage, batches, self._pool, first, look_ahead):
            outputs.append(result.table)
            rejects.extend(result.rejects)
            partly.extend(result.partial)
            if on_batch:
                on_batch(batch.num_rows)
        output = pa.concat_tables(outputs, promote_options="permissive") if len(outputs) > 1 else outputs[0]
        if output.num_rows + len(rejects) != table.num_rows:
            raise RuntimeError(
                f"stage {stage.name} shard {spec.shard_id}: {table.num_rows} records in, {output.num_rows} kept "
                f"+ {len(rejects)} rejected; every record must be kept or rejected"
            )
        metadata = stage.output_metadata()
        stats = {
            "shard": spec.shard_id,
            "in": table.num_rows,
            "out": output.num_rows,
            "rejected": len(rejects),
            "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
            "seconds": round(time.perf_counter() - started, 3),
            "started_at": started_at,  # wall clock (unix seconds): spans across workers, without their set-up
            "metadata": metadata,
            "worker": {"pid": os.getpid(), "node": self.node},
            **partial_stats(partly),
        }
        committed = self.drain()
        write = self._writer.submit(self.workdir.write_shard, stage.name, spec.shard_id, output,
                                    rejects_table(stage.name, rejects), stats, metadata,
                                    rejects_table(stage.name, partly) if partly else None)  # fmt: skip
        self._writing = (stats, write)
        return committed

    def drain(self) -> list[dict[str, Any]]:
        """Wait for the shard being written behind, if any: its stats once it is on disk (its error, if the write
        failed). Executors call it after a worker's last shard."""
        writing, self._writing = self._writing, None
        if writing is None:
            return []
        stats, future = writing
        future.result()
        return [stats]

    def _look_ahead(self, spec: ShardSpec, reading: Future) -> None:
        """Queue preparing the first batch of ``spec`` (being read by ``reading``) on the prefetch thread, behind
        this shard's last preparation."""

        def read_and_prepare() -> tuple[pa.Table, Any]:
            table = reading.result()
            return table, self.stage.prepare_batch(table.slice(0, self.stage.batch_rows()))

        self._ahead = (spec.shard_id, self._pool.submit(read_and_prepare))

    def _take_look_ahead(self, spec: ShardSpec) -> tuple[pa.Table | None, Any]:
        """(table, its first batch prepared) when ``spec`` was read ahead, else (None, None); a look-ahead of
        another shard is dropped (its error, if any, with it: that shard will be read again when it comes)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != spec.shard_id:
            return None, None
        return ahead[1].result()


def batch_results(
    stage: Stage,
    batches: list[pa.Table],
    pool: ThreadPoolExecutor | None = None,
    first: Any = None,
    then: Callable[[], None] | None = None,
) -> Iterator[tuple[pa.Table, BatchResult]]:
    """Each batch with its result, in order; for a ``prefetch`` stage the next batch is prepared on ``pool``'s
    thread (one of its own if None) while the current one computes (one batch ahead, so memory stays bounded),
    and a result handed back as a function is finished after the next batch's compute has started (two batches
    in flight on the device). ``first``: the first batch already prepared (by a look-ahead); ``then`` is called
    once the last batch's preparation is queued, to queue more work behind it."""
    if not stage.prefetch:
        for batch in batches:
            yield batch, stage.process_batch(batch)
        return
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(1, thread_name_prefix=f"{stage.name}-prefetch")
    try:
        ahead: Any = first if first is not None else pool.submit(stage.prepare_batch, batches[0])
        started: tuple[pa.Table, Any] | None = None  # the batch whose compute runs, and its result to finish
        for i, batch in enumerate(batches):
            prepared = ahead.result() if isinstance(ahead, Future) else ahead
            if i + 1 < len(batches):
                ahead = pool.submit(stage.prepare_batch, batches[i + 1])
            elif then is not None:
                then()
            result = stage.compute_batch(prepared)
            if started is not None:
                yield started[0], finished(started[1])
            started = (batch, result)
        if started is not None:
            yield started[0], finished(started[1])
    finally:
        if own_pool:
            pool.shutdown(wait=True)
