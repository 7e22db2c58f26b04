"""Executors run a stage's shards: in-process (``local``) or on Ray actors (``ray``), and a global stage's tasks.
Both call the same :class:`~saferclip_data.pipeline.worker.ShardWorker`, so they produce the same files; only
placement differs."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from saferclip_data.pipeline import mirror
from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import (
    GlobalContext,
    ShardSpec,
    StageConfig,
    ray_node_id,
    serial_map,
)
from saferclip_data.pipeline.workdir import WorkDir
from saferclip_data.pipeline.worker import ShardWorker, StageJob

log = logging.getLogger(__name__)


#: tasks one Ray worker process runs before it is replaced (bounds the memory a reused worker keeps)
TASKS_PER_WORKER = 4


def ray_map(fn: Callable[..., Any], items: list[tuple], cpus: float = 1.0, max_in_flight: int | None = None) -> list:
    """``fn(*args)`` for every tuple as Ray tasks spread over the cluster's nodes, at most ``max_in_flight`` at
    once (default: twice the cluster's CPUs / ``cpus``) so a long task list does not flood the scheduler; a task
    whose worker dies is retried. Results come back in argument order. Paths in a bucket work dir's mirror are
    moved to the mirror of the node the task runs on (:func:`~saferclip_data.pipeline.mirror.mirrored_task`)."""
    import ray

    if not items:
        return []
    if mirror.mirrors():
        for root in mirror.mirrors():
            mirror.publish_folder(root)  # what this process wrote so far, so that a task on another node can read it
        fn = mirror.mirrored_task(fn, mirror.mirrors())
    # a worker process serves a few tasks, then gives its memory back by exiting (Python keeps a task's peak)
    remote = ray.remote(num_cpus=cpus, max_retries=3, max_calls=TASKS_PER_WORKER, scheduling_strategy="SPREAD")(fn)
    limit = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / max(cpus, 0.01)))
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    queue = deque(enumerate(items))
    while queue or pending:
        while queue and len(pending) < limit:
            index, args = queue.popleft()
            pending[remote.remote(*args)] = index
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(ref)] = ray.get(ref)
    for root in mirror.mirrors():
        mirror.pull(root)  # what the tasks wrote on their nodes, as a shared file system would show it
    return results


def run_global_job(job: StageJob) -> dict[str, Any]:
    """Run a whole-data-set stage where this function is called (driver or a Ray task); its ``ctx.map`` tasks go
    to the cluster when the job runs on Ray."""
    started = time.perf_counter()
    stage = job.stage_cls(job.config, job.sections)
    stage.setup()
    workdir = WorkDir(job.workdir)
    workdir.pull_all()  # a bucket's work dir: what other nodes wrote, in this node's mirror (read by path)
    task_map = ray_map if job.executor == "ray" and ray_node_id() != "local" else serial_map
    ctx = GlobalContext(stage, workdir, task_map)
    output = stage.run_global(ctx)
    workdir.publish(stage.name)  # what the stage wrote outside the atomic writes, before the driver marks it done
    return {
        "counts": output.counts,
        "seconds": round(time.perf_counter() - started, 3),
        "metadata": output.metadata,
        "shards": ctx.shards,
    }


def plan_actors(stage: str, config: StageConfig, wanted: int, cluster: dict[str, float]) -> tuple[int, float, str]:
    """(actors, GPUs per actor, a note when the request was cut) for ``wanted`` actors on a cluster with these
    total resources. ``gpus: auto`` shares the cluster's GPUs among the actors (one each at most: concurrency 2 on
    one GPU gives 0.5 each, two actors feeding one GPU); an explicit request that the whole cluster could never
    hold is cut to what fits, with a note, instead of leaving actors waiting for resources forever."""
    total_gpus = cluster.get("GPU", 0.0)
    if config.gpus == "auto":
        gpus = min(1.0, total_gpus / max(1, wanted)) if total_gpus >= 1 else 0.0
    else:
        gpus = float(config.gpus)
    fits = [wanted]
    if config.cpus > 0:
        fits.append(int(cluster.get("CPU", 0.0) / config.cpus + 1e-9))
    if gpus > 0:
        fits.append(int(total_gpus / gpus + 1e-9))
    if min(fits) < 1:
        raise UserError(
            f"stage {stage}: one worker asks for cpus {config.cpus:g} and gpus {gpus:g}, more than the "
            f"whole Ray cluster has ({cluster.get('CPU', 0):g} CPUs, {total_gpus:g} GPUs)"
        )
    count = min(fits)
    note = ""
    if count < wanted:
        note = (f"concurrency {config.concurrency} x (cpus {config.cpus:g}, gpus {gpus:g}) does not fit the cluster "
                f"({cluster.get('CPU', 0):g} CPUs, {total_gpus:g} GPUs): running {count} worker(s)")  # fmt: skip
    return count, gpus, note


class LocalExecutor:
    """In-process, one shard after another: for debugging and machines without Ray. Same outputs as Ray."""

    name = "local"

    def run_map(self, job: StageJob, pending: list[ShardSpec], on_records, on_shard) -> None:
        worker = ShardWorker(job)
        for spec, upcoming in zip(pending, [*pending[1:], None]):
            for stats in worker.run_shard(spec, on_batch=on_records, upcoming=upcoming):
                on_shard(stats)
        for stats in worker.drain():
            on_shard(stats)

    def run_global(self, job: StageJob) -> dict[str, Any]:
        return run_global_job(job)

    def map(self, fn: Callable[..., Any], items: list[tuple], cpus: float = 1.0) -> list[Any]:
        return serial_map(fn, items, cpus)

    def close(self) -> None:
        pass


class RayExecutor:
    """Shards of a map stage stream through a pool of Ray actors (one model load per actor, at most one shard
    in flight per actor, so memory stays bounded); results coming back are per-shard stats, never data."""

    name = "ray"

    def __init__(self, address: str | None = None, object_store_mb: int = 1024):
        self.address = address
        self.object_store_mb = object_store_mb
        self._we_started = False

    def _ensure_ray(self):
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
            if mirror.session_variables():  # a bucket's work dir: every worker, on any node, joins its mirror session
                kwargs["runtime_env"] = {"env_vars": mirror.session_variables()}
            if self.address:
                kwargs["address"] = self.address
            else:
                # the embedded cluster keeps Ray's token authentication; only its notice that it is on is silenced
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
                # "local" starts a private instance even where `ray start` left a cluster running on this host
                kwargs.update(
                    address="local", include_dashboard=False, object_store_memory=self.object_store_mb * 2**20
                )
            if not self.address:  # before init: a kill during Ray's start-up must not leave its processes either
                from saferclip_data.pipeline import ray_watchdog

                self._watchdog = ray_watchdog.start("")
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError) as exc:
                if self.address:
                    raise UserError(f"cannot connect to the Ray cluster at {self.address}: {exc}") from None
                raise
            self._we_started = True
        return ray

    def run_map(self, job: StageJob, pending: list[ShardSpec], on_records, on_shard) -> None:
        ray = self._ensure_ray()
        config = job.config
        wanted = min(config.concurrency, len(pending))
        count, gpus, note = plan_actors(job.stage_cls.name, config, wanted, ray.cluster_resources())
        if note:
            log.warning("stage %s: %s", job.stage_cls.name, note)
        job = StageJob(job.stage_cls, config, job.sections, job.workdir, torch_threads=max(1, int(config.cpus)))
        # spread over the nodes (each reads and writes its own shards on the shared work dir); an actor whose node
        # dies is restarted elsewhere and its shard retried, so losing a worker node loses no work
        remote_cls = ray.remote(ShardWorker).options(
            num_cpus=config.cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=3, scheduling_strategy="SPREAD"
        )
        actors = [remote_cls.remote(job) for _ in range(count)]
        try:
            ray.get([a.ready.remote() for a in actors])
            for stats in self._shards_on(ray, actors, pending):
                on_records(stats["in"])
                on_shard(stats)
        finally:
            for actor in actors:
                ray.kill(actor)

    @staticmethod
    def _shards_on(ray, actors: list, specs: list[ShardSpec], max_losses: int = 20):
        """Yield each shard's stats as its actor commits it, one shard in flight per actor. Each actor is also
        promised its next shard (announced as ``upcoming``, so it reads that shard while finishing this one);
        a promised shard waits for its actor, so at the end one actor may have a shard more to do than another.
        An actor owes the shards it was given until their stats come back (it writes a shard while computing
        the next; an actor with nothing left to do is asked to ``drain``). The shards a lost
        actor owed (its node died, or it is restarting) go back to the queue with the one promised to it:
        shards are idempotent (written atomically, committed by a marker), so a rerun cannot leave half a
        shard. A stage's own error stops the stage."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        queue, idle, in_flight = deque(specs), list(range(len(actors))), {}
        promised: dict[int, ShardSpec] = {}
        owed: dict[int, list[ShardSpec]] = {worker: [] for worker in range(len(actors))}
        losses = 0
        while queue or in_flight or promised or any(owed.values()):
            while idle and (queue or promised):
                worker = next((w for w in idle if w in promised), idle[-1])
                spec = promised.pop(worker, None) or (queue.popleft() if queue else None)
                if spec is None:
                    break  # the remaining shards are promised to busy actors
                idle.remove(worker)
                upcoming = promised[worker] = queue.popleft() if queue else None
                if upcoming is None:
                    del promised[worker]
                owed[worker].append(spec)
                in_flight[actors[worker].run_shard.remote(spec, None, upcoming)] = worker
            for worker in [w for w in idle if owed[w]]:  # nothing more to give it: commit what it writes
                idle.remove(worker)
                in_flight[actors[worker].drain.remote()] = worker
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(ref)
            try:
                committed = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as exc:
                lost, owed[worker] = owed[worker], []
                if worker in promised:
                    lost.append(promised.pop(worker))
                losses += 1
                names = ", ".join(s.shard_id for s in lost) or "none"
                if losses > max_losses:
                    raise RuntimeError(f"shards {names}: workers lost {losses} times; last: {exc}") from exc
                log.warning("shards %s: their worker was lost (%s); retrying", names, type(exc).__name__)
                time.sleep(min(5.0, 0.5 * losses))  # a restarting actor needs a moment
                queue.extendleft(reversed(lost))
                idle.append(worker)  # max_restarts=-1: Ray brings it back on a live node
                continue
            idle.append(worker)
            for stats in committed:
                owed[worker] = [s for s in owed[worker] if s.shard_id != stats["shard"]]
                yield stats

    def run_global(self, job: StageJob) -> dict[str, Any]:
        ray = self._ensure_ray()
        gpus = plan_actors(job.stage_cls.name, job.config, 1, ray.cluster_resources())[1]
        task = ray.remote(run_global_job).options(num_cpus=job.config.cpus, num_gpus=gpus)
        return ray.get(task.remote(replace(job, executor="ray")))

    def map(self, fn: Callable[..., Any], items: list[tuple], cpus: float = 1.0) -> list[Any]:
        self._ensure_ray()
        return ray_map(fn, items, cpus)

    def close(self) -> None:
        if self._we_started:
            import ray

            ray.shutdown()
            self._we_started = False
        watchdog, self._watchdog = getattr(self, "_watchdog", None), None
        if watchdog is not None:
            watchdog.terminate()
            watchdog.wait(timeout=10)


def make_executor(kind: str, ray_address: str | None = None):
    if kind == "local":
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor()
    if kind == "ray":
        # inside `ray job submit` Ray sets RAY_ADDRESS: the job joins the cluster it was submitted to
        return RayExecutor(ray_address or os.environ.get("RAY_ADDRESS") or None)
    raise UserError(f"unknown executor '{kind}' (expected ray or local)")
