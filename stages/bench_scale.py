"""`saferclip-data bench scale`: how the heavy whole-data-set stages grow with the record count.

A synthetic pool of precomputed embeddings is written straight into a work dir as the completed ``embed`` and
``filter`` stages (clustered unit vectors, as CLIP embeddings are; half safe, half unsafe; a planted share of
near-duplicate groups with known answers), shard by shard so the writer never holds the pool. The stages under
test then run on it, each in a child process whose peak RSS is read from the OS, and the dedup result is
scored against the planted truth and, where the size allows it, against the exact all-pairs path.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from saferclip_data.pipeline.stage import REJECT_SCHEMA
from saferclip_data.pipeline.workdir import WorkDir

#: cosine of a planted duplicate to its original (about), and of two records of one cluster (about)
DUPLICATE_NOISE = 0.15
CLUSTER_NOISE = 1.0


@dataclass(frozen=True)
class SyntheticPool:
    rows: int
    dim: int = 512
    shard_rows: int = 50_000
    clusters: int = 1_000
    duplicate_share: float = 0.05  # share of records that are planted copies of another record
    seed: int = 0


def _fsl(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).reshape(-1)), vectors.shape[1])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(root: Path, pool: SyntheticPool) -> dict[str, str]:
    """Write the pool as completed ``embed`` and ``filter`` stages; returns planted duplicate -> original key.

    Record i of shard s is ``s{shard}-{i}``; a planted duplicate copies an earlier record of the same shard (same
    role, both modalities moved by small noise), so the truth is known without holding the pool."""
    wd = WorkDir(root)
    rng = np.random.default_rng(pool.seed)
    centres = _unit(rng.standard_normal((pool.clusters, pool.dim)).astype(np.float32))
    shards = [f"part-{i:05d}" for i in range(math.ceil(pool.rows / pool.shard_rows))]
    planted: dict[str, str] = {}
    for index, shard in enumerate(shards):
        n = min(pool.shard_rows, pool.rows - index * pool.shard_rows)
        srng = np.random.default_rng([pool.seed, index])
        keys = [f"s{index:05d}-{i:07d}" for i in range(n)]
        role = np.where(srng.random(n) < 0.5, "safe", "unsafe").astype(object)
        vectors = {}
        centre = srng.integers(0, pool.clusters, n)
        for modality in ("image", "text"):
            noise = srng.standard_normal((n, pool.dim)).astype(np.float32) * (CLUSTER_NOISE / math.sqrt(pool.dim))
            vectors[modality] = _unit(centres[centre] + noise)
        copies = np.flatnonzero(srng.random(n) < pool.duplicate_share)
        copies = copies[copies > 0]
        base = np.setdiff1d(np.arange(n), copies)
        originals = base[srng.integers(0, len(base), len(copies))]
        for modality in ("image", "text"):
            noise = srng.standard_normal((len(copies), pool.dim)).astype(np.float32)
            moved = vectors[modality][originals] + noise * (DUPLICATE_NOISE / math.sqrt(pool.dim))
            vectors[modality][copies] = _unit(moved)
        role[copies] = role[originals]
        planted.update((keys[c], keys[o]) for c, o in zip(copies, originals))
        embed = pa.table(
            {"key": keys, "image_embedding": _fsl(vectors["image"]), "text_embedding": _fsl(vectors["text"])}
        )
        filt = pa.table({"key": keys, "role": pa.array(role, pa.string()), "category": [None] * n})
        for stage, table in (("embed", embed), ("filter", filt)):
            stats = {"shard": shard, "in": n, "out": n, "rejected": 0, "seconds": 0.0, "metadata": {}}
            wd.write_shard(stage, shard, table, REJECT_SCHEMA.empty_table(), stats, {})
    for stage in ("embed", "filter"):
        wd.write_manifest(
            stage,
            {
                "stage": stage,
                "fingerprint": "synthetic",
                "complete": True,
                "shards": shards,
                "specs": [{} for _ in shards],
                "counts": {"in": pool.rows, "out": pool.rows},
            },
        )
    return planted


def run_stage(root: Path, stage: str, config: dict, executor: str = "local") -> dict:
    """Run one stage on a work dir in a child process; seconds, the child's peak RSS and the stage's counts."""
    code = (
        "import json,sys;from saferclip_data.stages.bench_scale import _child;"
        f"print(json.dumps(_child({str(root)!r}, {stage!r}, json.loads(sys.argv[1]), {executor!r})))"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, **result}


def _child(root: str, stage: str, config: dict, executor: str) -> dict:
    from saferclip_data.pipeline.executors import StageJob, make_executor
    from saferclip_data.stages import REGISTRY

    cls = REGISTRY[stage]
    wd = WorkDir(root)
    wd.reset_stage(stage)
    runner = make_executor(executor)
    try:
        result = runner.run_global(StageJob(cls, cls.Config(**config), {}, root))
    finally:
        runner.close()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"counts": result["counts"], "peak_rss_mb": peak_kb / 1024}
