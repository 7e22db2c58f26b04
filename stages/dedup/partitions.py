"""The dedup stage's search steps: k-means partitions of each role's vectors, searched exactly inside each.

The idea is semantic dedup's (SemDeDup; NeMo Curator's pipeline): near-duplicates sit close together, so k-means
cuts each role's vectors into partitions of about ``partition_rows`` and the exact search runs inside each
partition only. Work drops from N² to about N²/K and no process holds more than one group of partitions; a role
smaller than ``partition_rows`` is one partition, searched exactly whole. Each step is a task that
``GlobalContext.map`` runs; arguments and results are paths and counts, data goes through ``_partitions/``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.stage import worker_identity
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet
from saferclip_data.stages.columns import unit_rows
from saferclip_data.stages.knn import knn_search

PARTITION_DIR = "_partitions"
ROLES = ("safe", "unsafe")
EDGE_SCHEMA = pa.schema(
    [("modality", pa.string()), ("key", pa.string()), ("other", pa.string()), ("similarity", pa.float32()),
     ("key_shard", pa.int32()), ("other_shard", pa.int32())]
)  # fmt: skip


def partition_dir(root: str, stage: str) -> Path:
    return Path(root) / stage / PARTITION_DIR


def near_duplicates(
    vectors: np.ndarray, valid: np.ndarray, threshold: float, neighbours: int, backend: str = "auto"
) -> dict[int, list[tuple[int, float]]]:
    """Edges row -> [(row within threshold, cosine), most similar first] from an exact kNN over the valid rows:
    the pure core of the search, run on each partition."""
    rows = np.flatnonzero(valid)
    if len(rows) < 2:
        return {}
    sims, idx = knn_search(vectors[rows], vectors[rows], min(neighbours + 1, len(rows)), backend=backend)
    edges: dict[int, list[tuple[int, float]]] = {}
    for qi, (srow, irow) in enumerate(zip(sims, idx)):
        for s, j in zip(srow, irow):
            if j < 0 or j == qi or s < threshold:
                continue
            edges.setdefault(int(rows[qi]), []).append((int(rows[j]), float(s)))
    return edges


def role_vectors(table: pa.Table, role: str, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers in the shard, unit vectors) of the shard's records of ``role`` that have this embedding."""
    rows = np.flatnonzero(np.asarray(table["role"].to_pylist(), dtype=object) == role)
    if not len(rows):
        return rows, np.zeros((0, 0), np.float32)
    column = table[f"{modality}_embedding"]
    vectors, valid = unit_rows(column.take(pa.array(rows)), column.type.list_size)
    return rows[valid], vectors[valid]


def sample_shard(root: str, inputs: dict, shard_id: str, index: int, fraction: float, seed: int,
                 by: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
    """Step 1: a seeded share of this shard's vectors per ``role/modality`` (the k-means training set)."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    rng = np.random.default_rng([seed, index])
    out = {}
    for role in ROLES:
        for modality in by:
            _, vectors = role_vectors(table, role, modality)
            out[f"{role}/{modality}"] = vectors[rng.random(len(vectors)) < fraction]
    return out


def assign_shard(root: str, stage: str, inputs: dict, shard_id: str, index: int, by: list[str],
                 spill_margin: float) -> dict[str, np.ndarray]:  # fmt: skip
    """Step 3: this shard's vectors sorted by their nearest centroid (a vector about as close to its second
    centroid, within ``spill_margin`` in cosine, goes to both: a duplicate pair on a border is then found in
    either); returns the partition counts per role-modality."""
    table = WorkDir(root).read_aligned(shard_id, inputs)
    counts = {}
    for role in ROLES:
        for modality in by:
            name = f"{role}-{modality}"
            centroids = np.load(partition_dir(root, stage) / f"centroids-{name}.npy")
            rows, vectors = role_vectors(table, role, modality)
            members, partition = _nearest_partitions(vectors, centroids, spill_margin) if len(rows) else (
                np.zeros(0, np.int64), np.zeros(0, np.int64))  # fmt: skip
            order = np.argsort(partition, kind="stable")
            members, partition = members[order], partition[order]
            out = partition_dir(root, stage) / name
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{index:06d}.npy", vectors[members].astype(np.float16) if len(rows) else
                    np.zeros((0, centroids.shape[1]), np.float16))  # fmt: skip
            keys = table["key"].take(pa.array(rows[members] if len(rows) else [], pa.int64()))
            atomic_write_parquet(out / f"{index:06d}.keys.parquet", pa.table({"key": keys}))
            counts[name] = np.bincount(partition, minlength=len(centroids)).astype(np.int64)
    return counts


def _nearest_partitions(vectors: np.ndarray, centroids: np.ndarray,
                        spill_margin: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(member rows, partition) pairs: every row's nearest centroid, plus its second within the spill margin."""
    import faiss

    search = faiss.IndexFlatIP(centroids.shape[1])
    search.add(centroids)
    sims, nearest = search.search(np.ascontiguousarray(vectors), min(2, len(centroids)))
    members, partition = np.arange(len(vectors)), nearest[:, 0].astype(np.int64)
    if len(centroids) > 1:
        spill = np.flatnonzero(sims[:, 1] >= sims[:, 0] - spill_margin)
        members = np.concatenate([members, spill])
        partition = np.concatenate([partition, nearest[spill, 1]])
    return members, partition


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
    """Step 4: exact near-duplicate edges inside each partition of [lo, hi), written to
    ``edges-<name>-<lo>.parquet``. ``slices``: for each shard with rows in the range, (shard index, its first
    row of partition lo, its row count of each partition lo..hi-1)."""
    folder = partition_dir(root, stage) / name
    modality = name.split("-", 1)[1]
    vectors, keys = [], []
    for index, first, sizes in slices:
        rows = sum(sizes)
        vectors.append(np.load(folder / f"{index:06d}.npy", mmap_mode="r")[first : first + rows])
        keys.append(pq.read_table(folder / f"{index:06d}.keys.parquet")["key"].slice(first, rows))
    parts: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for slot, (_, _, sizes) in enumerate(slices):
        offset = 0
        for p, n in zip(range(lo, hi), sizes):
            if n:
                parts[p].append((slot, offset, n))
            offset += n
    edges: list[tuple] = []
    largest = 0
    for p in sorted(parts):
        members = parts[p]
        matrix = np.concatenate([np.asarray(vectors[s][o : o + n], np.float32) for s, o, n in members])
        names = [k for s, o, n in members for k in keys[s].slice(o, n).to_pylist()]
        shard_of = [slices[s][0] for s, o, n in members for _ in range(n)]
        largest = max(largest, len(names))
        found = near_duplicates(matrix, np.ones(len(names), bool), threshold, neighbours, backend)
        edges += [(modality, names[q], names[j], s, shard_of[q], shard_of[j])
                  for q in sorted(found) for j, s in found[q]]  # fmt: skip
    path = partition_dir(root, stage) / f"edges-{name}-{lo:06d}.parquet"
    columns = list(zip(*edges)) if edges else [[] for _ in EDGE_SCHEMA]
    atomic_write_parquet(path, pa.table([pa.array(c, f.type) for c, f in zip(columns, EDGE_SCHEMA)],
                                        schema=EDGE_SCHEMA))  # fmt: skip
    rows = sum(sum(sizes) for _, _, sizes in slices)
    return {"path": str(path), "edges": len(edges), "rows": rows, "largest": largest, **worker_identity()}
