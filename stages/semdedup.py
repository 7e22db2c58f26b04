"""Partitioned near-duplicate search: the dedup stage at a size where all-pairs search is out of reach.

The idea is semantic dedup's (SemDeDup; NeMo Curator's pipeline): near-duplicates sit close together, so k-means
cuts each role's vectors into partitions and the exact search runs inside each partition only. Work drops from
N² to about N²/K, and no process holds more than one group of partitions. The steps, each a set of tasks that
``GlobalContext.map`` spreads over the cluster (arguments and results are paths and counts; data goes through
the stage's ``_partitions/`` folder):

1. ``sample_shard``: a seeded sample of every shard's vectors, per role and modality.
2. k-means (faiss, spherical) on the sample, on the stage's own process: centroids per role and modality.
3. ``assign_shard``: each shard's vectors go to their nearest centroid; written sorted by partition (one fp16
   ``.npy`` and one key table per shard), with the count of each partition.
4. ``search_bucket``: contiguous runs of partitions, sized to a row budget, read as slices of every shard's
   sorted file; exact top-k inside each partition; the edges at or above the threshold are written out.
5. The leader rule of the exact path (:func:`leader_over_edges`, key order), over the edges only: a record
   with no edge is kept and affects nobody, so the memory needed grows with the duplicates, not the records.
6. ``write_dedup_shard``: each output shard is written by a task, with its node in the marker.

A pair split over two partitions is missed: ``bench scale`` and the tests measure the recall against the exact
path, which stays the default below ``exact_max_rows``.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.executors import worker_identity
from saferclip_data.pipeline.stage import GlobalContext, Reject, write_global_shard
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet
from saferclip_data.stages.knn import knn_search
from saferclip_data.stages.score import unit_rows

PARTITION_DIR = "_partitions"
Node = TypeVar("Node")
ROLES = ("safe", "unsafe")
EDGE_SCHEMA = pa.schema(
    [("modality", pa.string()), ("key", pa.string()), ("other", pa.string()), ("similarity", pa.float32()),
     ("key_shard", pa.int32()), ("other_shard", pa.int32())]
)  # fmt: skip


def _folder(root: str, stage: str) -> Path:
    return Path(root) / stage / PARTITION_DIR


def _read(root: str, shard_id: str, inputs: dict[str, tuple[str, ...]]) -> pa.Table:
    return WorkDir(root).read_aligned(shard_id, inputs)


def _role_vectors(table: pa.Table, role: str, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers in the shard, unit vectors) of the shard's records of ``role`` that have this embedding."""
    rows = np.flatnonzero(np.asarray(table["role"].to_pylist(), dtype=object) == role)
    if not len(rows):
        return rows, np.zeros((0, 0), np.float32)
    column = table[f"{modality}_embedding"]
    vectors, valid = unit_rows(column.take(pa.array(rows)), column.type.list_size)
    return rows[valid], vectors[valid]


def sample_shard(root: str, inputs: dict, shard_id: str, index: int, fraction: float, seed: int,
                 by: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
    """A seeded share of this shard's vectors per ``role/modality`` (the k-means training set)."""
    table = _read(root, shard_id, inputs)
    rng = np.random.default_rng([seed, index])
    out = {}
    for role in ROLES:
        for modality in by:
            _, vectors = _role_vectors(table, role, modality)
            out[f"{role}/{modality}"] = vectors[rng.random(len(vectors)) < fraction]
    return out


def train_centroids(sample: np.ndarray, partitions: int, seed: int, iterations: int) -> np.ndarray:
    """Spherical k-means centroids (faiss), unit rows; fewer partitions when the sample is small."""
    import faiss

    k = max(1, min(partitions, len(sample) // 4))
    if k == 1:
        centroid = sample.mean(axis=0, keepdims=True) if len(sample) else np.ones((1, sample.shape[1]), np.float32)
        return (centroid / max(float(np.linalg.norm(centroid)), 1e-12)).astype(np.float32)
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(len(sample) / k)))  # fmt: skip
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(kmeans.centroids, np.float32)


def assign_shard(root: str, stage: str, inputs: dict, shard_id: str, index: int, by: list[str],
                 spill_margin: float) -> dict[str, np.ndarray]:  # fmt: skip
    """Write this shard's vectors sorted by their nearest centroid (a vector about as close to its second centroid,
    within ``spill_margin`` in cosine, goes to both: a duplicate pair on a border is then found in either); return
    the partition counts per role/modality."""
    import faiss

    table = _read(root, shard_id, inputs)
    folder = _folder(root, stage)
    counts = {}
    for role in ROLES:
        for modality in by:
            name = f"{role}-{modality}"
            centroids = np.load(folder / f"centroids-{name}.npy")
            rows, vectors = _role_vectors(table, role, modality)
            members, partition = np.zeros(0, np.int64), np.zeros(0, np.int64)
            if len(rows):
                search = faiss.IndexFlatIP(centroids.shape[1])
                search.add(centroids)
                sims, nearest = search.search(np.ascontiguousarray(vectors), min(2, len(centroids)))
                members, partition = np.arange(len(rows)), nearest[:, 0].astype(np.int64)
                if len(centroids) > 1:
                    spill = np.flatnonzero(sims[:, 1] >= sims[:, 0] - spill_margin)
                    members = np.concatenate([members, spill])
                    partition = np.concatenate([partition, nearest[spill, 1]])
            order = np.argsort(partition, kind="stable")
            members, partition = members[order], partition[order]
            out = folder / name
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{index:06d}.npy", vectors[members].astype(np.float16) if len(rows) else
                    np.zeros((0, centroids.shape[1]), np.float16))  # fmt: skip
            keys = table["key"].take(pa.array(rows[members] if len(rows) else [], pa.int64()))
            atomic_write_parquet(out / f"{index:06d}.keys.parquet", pa.table({"key": keys}))
            counts[name] = np.bincount(partition, minlength=len(centroids)).astype(np.int64)
    return counts


def buckets(counts: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Contiguous partition ranges [lo, hi) of at most ``max_rows`` rows each (a larger partition alone)."""
    out, lo, rows = [], 0, 0
    for p, n in enumerate(counts.tolist()):
        if p > lo and rows + n > max_rows:
            out.append((lo, p))
            lo, rows = p, 0
        rows += n
    if lo < len(counts):
        out.append((lo, len(counts)))
    return [(a, b) for a, b in out if counts[a:b].sum() > 0]


def search_bucket(root: str, stage: str, name: str, lo: int, hi: int, slices: list[tuple[int, int, list[int]]],
                  threshold: float, neighbours: int, backend: str) -> dict[str, Any]:  # fmt: skip
    """Exact near-duplicate edges inside each partition of [lo, hi); written to ``edges-<name>-<lo>.parquet``.
    ``slices``: for each shard with rows in the range, (shard index, its first row of partition lo, its row
    count of each partition lo..hi-1)."""
    folder = _folder(root, stage) / name
    modality = name.split("-", 1)[1]
    vectors, keys = [], []
    for index, first, sizes in slices:
        rows = sum(sizes)
        vectors.append(np.load(folder / f"{index:06d}.npy", mmap_mode="r")[first : first + rows])
        keys.append(pq.read_table(folder / f"{index:06d}.keys.parquet")["key"].slice(first, rows))
    taken = [index for index, _, _ in slices]
    parts: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for slot, (_, _, sizes) in enumerate(slices):
        offset = 0
        for p, n in zip(range(lo, hi), sizes):
            if n:
                parts[p].append((slot, offset, n))
            offset += n
    edges: dict[str, list] = {name: [] for name in EDGE_SCHEMA.names}
    largest = 0
    for p in sorted(parts):
        members = parts[p]
        matrix = np.concatenate([np.asarray(vectors[s][o : o + n], np.float32) for s, o, n in members])
        names = [k for s, o, n in members for k in keys[s].slice(o, n).to_pylist()]
        shard_of = [taken[s] for s, o, n in members for _ in range(n)]
        largest = max(largest, len(names))
        if len(names) < 2:
            continue
        sims, idx = knn_search(matrix, matrix, min(neighbours + 1, len(names)), backend=backend)
        for q, (srow, irow) in enumerate(zip(sims, idx)):
            for s, j in zip(srow, irow):
                if j >= 0 and j != q and s >= threshold:
                    edges["modality"].append(modality)
                    edges["key"].append(names[q])
                    edges["other"].append(names[j])
                    edges["similarity"].append(float(s))
                    edges["key_shard"].append(shard_of[q])
                    edges["other_shard"].append(shard_of[j])
    path = _folder(root, stage) / f"edges-{name}-{lo:06d}.parquet"
    atomic_write_parquet(path, pa.table(edges, schema=EDGE_SCHEMA))
    rows = sum(sum(sizes) for _, _, sizes in slices)
    return {"path": str(path), "edges": len(edges["key"]), "rows": rows, "largest": largest, **worker_identity()}


def greedy_leaders(
    order: Iterable[Node], claims: Callable[[Node], Iterable[tuple[Node, str]]]
) -> dict[Node, tuple[Node, str]]:
    """The leader rule: visit ``order``; an undecided node is kept and claims every undecided node that
    ``claims(node)`` names, in that order, as its duplicate (with the reason given). Returns duplicate -> (kept,
    why). Chains do not merge: a duplicate is always named by the record kept for it."""
    decided: dict[Node, tuple[Node, str]] = {}
    kept: set[Node] = set()
    for node in order:
        if node in decided or node in kept:
            continue
        kept.add(node)
        for other, why in claims(node):
            if other not in decided and other not in kept:
                decided[other] = (node, why)
    return decided


def leader_over_edges(edges: pa.Table, modalities: list[str]) -> dict[str, tuple[str, str]]:
    """Duplicate key -> (kept key, why): the exact path's leader rule (key order; each visited record claims its
    undecided neighbours, modality by modality in ``modalities`` order, most similar first) over the edges only."""
    graph: dict[str, set[tuple[int, float, str]]] = defaultdict(set)  # a set: a spilled pair is found twice
    rank = {m: i for i, m in enumerate(modalities)}
    for m, key, other, sim in zip(*(edges[c].to_pylist() for c in ("modality", "key", "other", "similarity"))):
        graph[key].add((rank[m], -sim, other))
    nodes = sorted(set(graph) | {o for targets in graph.values() for _, _, o in targets})

    def claims(key: str) -> Iterable[tuple[str, str]]:
        return ((other, f"{modalities[m]} cosine {-neg:.3f}") for m, neg, other in sorted(graph.get(key, ())))

    return greedy_leaders(nodes, claims)


def write_dedup_shard(root: str, stage: str, metadata: dict[str, str], shard_id: str,
                      decisions_path: str) -> dict[str, Any]:  # fmt: skip
    """The dedup output of one shard from the decisions: kept rows with how many they absorbed, the rest rejected."""
    table = WorkDir(root).read_shard("filter", shard_id, ["key", "role", "category"])
    decisions = pq.read_table(decisions_path, filters=[("shard", "=", shard_id)]).to_pylist()
    duplicate_of = {d["key"]: (d["kept"], d["why"]) for d in decisions if d["kept"] is not None}
    absorbed = {d["key"]: d["absorbed"] for d in decisions if d["kept"] is None}
    keys = table["key"].to_pylist()
    keep = [i for i, k in enumerate(keys) if k not in duplicate_of]
    rejects = [Reject(k, "near-duplicate", f"of {duplicate_of[k][0]} ({duplicate_of[k][1]})")
               for k in keys if k in duplicate_of]  # fmt: skip
    out = table.take(pa.array(keep, pa.int64()))
    out = out.append_column("duplicates", pa.array([absorbed.get(keys[i], 0) for i in keep], pa.int32()))
    return write_global_shard(WorkDir(root), stage, metadata, shard_id, out, rejects, table.num_rows,
                              worker_identity())  # fmt: skip


def shard_of_keys(edges: pa.Table, shard_ids: list[str]) -> dict[str, str]:
    """key -> shard id of every record named in the edges."""
    out = dict(zip(edges["key"].to_pylist(), (shard_ids[i] for i in edges["key_shard"].to_pylist())))
    out.update(zip(edges["other"].to_pylist(), (shard_ids[i] for i in edges["other_shard"].to_pylist())))
    return out


def decisions_table(decided: dict[str, tuple[str, str]], shard_of: dict[str, str]) -> pa.Table:
    """One row per duplicate (its kept record and why) and per kept record that absorbed others, by shard."""
    absorbed: dict[str, int] = defaultdict(int)
    for kept, _ in decided.values():
        absorbed[kept] += 1
    rows = [(shard_of[k], k, kept, why, 0) for k, (kept, why) in decided.items()]
    rows += [(shard_of[k], k, None, None, n) for k, n in absorbed.items()]
    rows.sort(key=lambda r: (r[0], r[1]))
    names = ("shard", "key", "kept", "why", "absorbed")
    columns = list(zip(*rows)) if rows else [[] for _ in names]
    types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.int32())
    return pa.table({n: pa.array(list(c), t) for n, c, t in zip(names, columns, types)})


def run_partitioned(ctx: GlobalContext, config: Any, shard_ids: list[str], total: int) -> dict[str, int]:
    """The partitioned dedup of the whole stage (steps 1-6 of the module docstring); returns its counts."""
    c = config
    root, stage = str(ctx.workdir.root), ctx.stage.name
    folder = _folder(root, stage)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    inputs = {"filter": ("key", "role"), "embed": ("key", *(f"{m}_embedding" for m in c.by))}
    fraction = min(1.0, c.kmeans_sample / max(1, total))
    by = list(c.by)
    samples = ctx.map(sample_shard, [(root, inputs, s, i, fraction, c.seed, by) for i, s in enumerate(shard_ids)])
    names = [f"{role}-{m}" for role in ROLES for m in c.by]
    for name in names:
        role, modality = name.split("-", 1)
        sample = [part[f"{role}/{modality}"] for part in samples if len(part[f"{role}/{modality}"])]
        if not sample:
            np.save(folder / f"centroids-{name}.npy", np.ones((1, 1), np.float32))
            continue
        sample = np.concatenate(sample)
        partitions = math.ceil(len(sample) / fraction / c.partition_rows)
        np.save(folder / f"centroids-{name}.npy", train_centroids(sample, partitions, c.seed, c.kmeans_iterations))
    del samples
    counts = ctx.map(assign_shard, [(root, stage, inputs, s, i, by, c.spill_margin) for i, s in enumerate(shard_ids)])
    searches = []
    for name in names:
        per_shard = [part[name] for part in counts]
        modality = name.split("-", 1)[1]
        threshold = c.image_threshold if modality == "image" else c.text_threshold
        starts = [np.concatenate([[0], np.cumsum(n)]) for n in per_shard]
        for lo, hi in buckets(np.sum(per_shard, axis=0), c.task_rows):
            slices = [(i, int(start[lo]), n[lo:hi].tolist()) for i, (start, n) in enumerate(zip(starts, per_shard))
                      if start[hi] > start[lo]]  # fmt: skip
            searches.append((root, stage, name, lo, hi, slices, threshold, c.neighbours, c.backend))
    results = ctx.map(search_bucket, searches)
    edges = pa.concat_tables([pq.read_table(r["path"]) for r in results]) if results else EDGE_SCHEMA.empty_table()
    decided = leader_over_edges(edges, list(c.by))
    decisions = folder / "decisions.parquet"
    atomic_write_parquet(decisions, decisions_table(decided, shard_of_keys(edges, shard_ids)))
    for name in names:  # the sorted vector copies are no longer needed; edges and decisions stay for audit
        shutil.rmtree(folder / name, ignore_errors=True)
    metadata = ctx.stage.output_metadata()
    written = ctx.map(write_dedup_shard, [(root, stage, metadata, s, str(decisions)) for s in shard_ids])
    ctx.committed(shard_ids)
    ctx.workdir.write_task_log(stage, "partitions", [{k: r[k] for k in ("path", "edges", "rows", "largest", "pid",
                                                                        "node")} for r in results])  # fmt: skip
    records_in = sum(w["in"] for w in written)
    return {
        "in": records_in,
        "out": records_in - len(decided),
        "rejected": len(decided),
        "partition_tasks": len(results),
        "largest_partition": max((r["largest"] for r in results), default=0),
    }
