"""IVF search with no index in any process: the neighbours stage's ``ivf_flat`` path.

An in-memory IVF index holds the whole pool (2 bytes x dim a row: 100 GB at 10^8 rows of 512-d). Here the lists
live on disk and the work is cut by list instead, so each task holds a bounded share of the pool and queries:

1. ``train_lists``: spherical k-means (faiss) on a seeded sample of the pool; the centroids are then reordered
   so that neighbouring lists get neighbouring numbers (a coarse k-means over the centroids).
2. ``assign_pool_piece``: each pool piece's rows sorted by their nearest list (fp16 rows, and their key, group,
   searchable row and category scores in an Arrow file that tasks map without reading it whole).
3. ``assign_query_shard``: each shard's unsafe queries sorted by their nearest list, their *home*.
4. ``search_lists``: contiguous runs of home lists, cut so that the queries and the pool rows they need stay
   within a budget. A query is compared with every row of its home's *neighbourhood*: the ``nprobe`` lists whose
   centroids are nearest the home's (exact fp32 cosine with the fp16 rows). The top ``want`` are kept (ties to
   the lower pool row, as in the exact search), the query's exclusions applied, and the candidates written
   sorted by shard.

Probing by the home's neighbourhood rather than by each query's own nearest lists is what bounds a task: all
queries of one home need the same ``nprobe`` lists, however scattered their own nearest lists would be. A
query's result depends on its vector and the centroids only, not on how the tasks were cut; its recall against
the exact search is measured by the tests and ``bench scale``. The neighbours stage then reads, per shard, the
slices of the task outputs that hold its queries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saferclip_data.pipeline.stage import worker_identity
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_bytes, atomic_write_npy
from saferclip_data.stages.columns import unit_rows
from saferclip_data.stages.knn import train_centroids

LISTS_DIR = "lists"
KMEANS_ITERATIONS = 20
CHUNK = 4096  # queries per matrix product against one list (bounds the similarity block)
#: candidates picked beyond ``want`` by the matrix product, then re-scored exactly: the top ``want`` change only if
#: more than this many rows sit within the product's rounding (~1e-7) of the want-th best
RESCORE_MARGIN = 16


def write_arrow(path: Path, table: pa.Table) -> None:
    """An uncompressed Arrow IPC file: readers memory-map it and slice rows without reading it whole."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _nearest(centroids: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    import faiss

    search = faiss.IndexFlatIP(centroids.shape[1])
    search.add(centroids)
    return search.search(np.ascontiguousarray(vectors, np.float32), min(k, len(centroids)))[1]


def spatial_order(centroids: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the centroids grouping near ones together (coarse k-means, ~32 lists a group), so a
    contiguous run of lists covers one region of the space and the lists its queries probe overlap."""
    groups = max(1, len(centroids) // 32)
    if groups == 1:
        return np.arange(len(centroids))
    coarse = train_centroids(centroids, groups, seed, KMEANS_ITERATIONS)
    return np.lexsort((np.arange(len(centroids)), _nearest(coarse, centroids, 1)[:, 0]))


def train_lists(folder: str, kind: str, count: int, rows: int, nlist: int, sample_per_list: int,
                seed: int = 0) -> int:  # fmt: skip
    """Train the pool's lists on a seeded sample of every piece; returns the number of lists."""
    root = Path(folder)
    rng = np.random.default_rng(seed)
    share = min(1.0, sample_per_list * nlist / rows)
    pieces = (np.load(root / kind / f"{i:06d}.npy", mmap_mode="r") for i in range(count))
    sample = np.concatenate([np.asarray(p[rng.random(len(p)) < share], np.float32) for p in pieces])
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means sums in one order: the same centroids in a Ray task and in-process
    try:
        centroids = train_centroids(sample, nlist, seed, KMEANS_ITERATIONS)
        centroids = centroids[spatial_order(centroids, seed)]
    finally:
        faiss.omp_set_num_threads(threads)
    (root / LISTS_DIR).mkdir(exist_ok=True)
    atomic_write_npy(root / LISTS_DIR / f"centroids-{kind}.npy", centroids)
    return len(centroids)


def assign_pool_piece(folder: str, kind: str, index: int, first_row: int, first_searchable: int) -> np.ndarray:
    """Sort one pool piece's rows of ``kind`` by their nearest list; returns its row count per list.
    ``first_row`` / ``first_searchable``: the piece's first pool row and first searchable row of this kind."""
    root = Path(folder)
    out = root / LISTS_DIR / kind
    out.mkdir(parents=True, exist_ok=True)
    centroids = np.load(root / LISTS_DIR / f"centroids-{kind}.npy")
    vectors = np.load(root / kind / f"{index:06d}.npy")
    local = np.load(root / kind / f"{index:06d}.rows.npy")
    home = _nearest(centroids, vectors.astype(np.float32), 1)[:, 0] if len(vectors) else np.zeros(0, np.int64)
    order = np.argsort(home, kind="stable")
    atomic_write_npy(out / f"{index:06d}.npy", vectors[order])
    meta = pq.read_table(root / "keys" / f"{index:06d}.parquet").take(pa.array(local[order], pa.int64()))
    meta = meta.append_column("searchable", pa.array(first_searchable + order, pa.int64()))
    meta = meta.append_column("pool_row", pa.array(first_row + local[order], pa.int64()))
    write_arrow(out / f"{index:06d}.arrow", meta)
    return np.bincount(home, minlength=len(centroids)).astype(np.int64)


def nearest_order(centroids: np.ndarray, own: int) -> np.ndarray:
    """Every list ordered by its centroid's closeness to list ``own``'s, itself first: a neighbourhood of ``nprobe``
    lists is the first ``nprobe`` of these (see :func:`neighbourhoods`)."""
    row = _nearest(centroids, centroids[own : own + 1], len(centroids))[0]
    return np.concatenate([[own], row[row != own]])


def neighbourhoods(centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """Per list, the ``nprobe`` lists whose centroids are nearest its own, itself first: the lists searched for
    every query whose home it is."""
    near = _nearest(centroids, centroids, nprobe)
    out = np.empty_like(near)
    for own, row in enumerate(near):  # a tie may rank another list before the list itself
        out[own] = np.concatenate([[own], row[row != own]])[: near.shape[1]]
    return out


def assign_query_shard(root: str, inputs: dict, group_column: str, modality: str, query_kind: str, pool_kind: str,
                       shard_index: int, shard_id: str) -> np.ndarray:  # fmt: skip
    """Write this shard's searchable unsafe queries sorted by home list (nearest centroid); returns the query count
    per home list."""
    from saferclip_data.stages.safe_pool import group_hash

    wd = WorkDir(root)
    folder = wd.stage_dir("neighbours") / "_pool" / LISTS_DIR
    centroids = np.load(folder / f"centroids-{pool_kind}.npy")
    table = wd.read_aligned(shard_id, inputs)
    vectors, valid = unit_rows(table[f"{query_kind}_embedding"], table.schema.field("text_embedding").type.list_size)
    rows = np.flatnonzero(valid & pc.equal(table["role"], "unsafe").fill_null(False).to_numpy(zero_copy_only=False))
    home = _nearest(centroids, vectors[rows], 1)[:, 0] if len(rows) else np.zeros(0, np.int64)
    order = np.argsort(home, kind="stable")
    rows, home = rows[order], home[order]
    out = folder / "queries" / modality
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_npy(out / f"{shard_index:06d}.npy", vectors[rows].astype(np.float16))
    picked = table.take(pa.array(rows, pa.int64()))
    meta = pa.table({"row": pa.array(rows, pa.int64()), "group": pa.array(group_hash(picked[group_column].to_pylist())),
                     "category": picked["category"]})  # fmt: skip
    write_arrow(out / f"{shard_index:06d}.arrow", meta)
    return np.bincount(home, minlength=len(centroids)).astype(np.int64)


def plan_tasks(home_counts: np.ndarray, pool_counts: np.ndarray, near: np.ndarray, max_queries: int,
               max_pool_rows: int) -> list[tuple[int, int, list[int]]]:  # fmt: skip
    """Contiguous runs [lo, hi) of home lists with the union of their neighbourhoods (``near``): a run ends before
    it would pass ``max_queries`` queries or ``max_pool_rows`` pool rows (one home list may exceed them alone:
    its neighbourhood is the least a task can hold)."""
    tasks: list[tuple[int, int, list[int]]] = []
    lo = hi = queries = rows = 0
    lists: set[int] = set()
    for home in np.flatnonzero(home_counts).tolist():
        new = set(near[home].tolist()) - lists
        extra = int(pool_counts[sorted(new)].sum())
        if lists and (queries + home_counts[home] > max_queries or rows + extra > max_pool_rows):
            tasks.append((lo, hi, sorted(lists)))
            lists, queries, rows = set(), 0, 0
            new = set(near[home].tolist())
            extra = int(pool_counts[sorted(new)].sum())
        if not lists:
            lo = home
        hi = home + 1
        queries += int(home_counts[home])
        lists |= new
        rows += extra
    if lists:
        tasks.append((lo, hi, sorted(lists)))
    return tasks


def _pool_slices(folder: Path, kind: str, lists: list[int], counts: np.ndarray):
    """The rows of ``lists`` from every piece: (fp16 matrix, list boundaries, (piece, offset) per row, meta)."""
    starts = np.concatenate([np.zeros((len(counts), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    pieces = [i for i in range(len(counts)) if counts[i, lists].sum()]
    mapped = {i: np.load(folder / kind / f"{i:06d}.npy", mmap_mode="r") for i in pieces}
    metas = {i: read_arrow(folder / kind / f"{i:06d}.arrow") for i in pieces}
    blocks, bounds, where, groups, scores = [], [0], [], [], []
    for li in lists:
        for i in pieces:
            a, b = int(starts[i, li]), int(starts[i, li + 1])
            if b > a:
                blocks.append(np.asarray(mapped[i][a:b]))
                where.append(np.stack([np.full(b - a, i), np.arange(a, b)], axis=1))
                part = metas[i].slice(a, b - a)
                groups.append(part["group"].to_numpy())
                scores.append(part.select([n for n in part.column_names if n.startswith("score_")]))
        bounds.append(sum(len(x) for x in blocks))
    del mapped
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float16)
    where = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
    group = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    score = pa.concat_tables(scores) if scores else None
    return matrix, np.asarray(bounds), where, group, score, metas


def _queries(folder: Path, modality: str, lo: int, hi: int, homes: np.ndarray):
    """The queries whose home list is in [lo, hi), from every shard: vectors, home list, shard, meta."""
    vectors, home, shards, metas = [], [], [], []
    starts = np.concatenate([np.zeros((len(homes), 1), np.int64), np.cumsum(homes, axis=1)], axis=1)
    for s in np.flatnonzero(starts[:, hi] > starts[:, lo]):
        a, b = int(starts[s, lo]), int(starts[s, hi])
        base = folder / "queries" / modality / f"{s:06d}"
        vectors.append(np.asarray(np.load(f"{base}.npy", mmap_mode="r")[a:b], np.float32))
        home.append(np.repeat(np.arange(lo, hi), homes[s, lo:hi]))
        shards.append(np.full(b - a, s, np.int32))
        metas.append(read_arrow(Path(f"{base}.arrow")).slice(a, b - a))
    return np.concatenate(vectors), np.concatenate(home), np.concatenate(shards), pa.concat_tables(metas)


def _top_entries(vectors: np.ndarray, home: np.ndarray, near: np.ndarray, lists: list[int], matrix: np.ndarray,
                 bounds: np.ndarray, searchable: np.ndarray, want: int) -> tuple[np.ndarray, ...]:  # fmt: skip
    """Each query's ``want`` best rows over its home's neighbourhood: (query, union row, similarity) sorted by
    query, similarity descending, then searchable row (the exact search's tie rule).

    Candidates are picked with a matrix product, whose last bits depend on the shapes and threads of the BLAS call
    (a Ray task and an in-process run differ), then re-scored one dot product at a time (``einsum``: the same sums
    in the same order wherever it runs), so the similarities written are the same bytes on any executor."""
    slot = {li: j for j, li in enumerate(lists)}
    pick = want + RESCORE_MARGIN
    qs, rs = [], []
    for h in np.unique(home).tolist():
        members = np.flatnonzero(home == h)
        rows = np.concatenate([np.arange(bounds[slot[li]], bounds[slot[li] + 1]) for li in near[h].tolist()])
        if not len(rows):
            continue
        pool = matrix[rows].astype(np.float32)
        for start in range(0, len(members), CHUNK):
            q = members[start : start + CHUNK]
            sims = vectors[q] @ pool.T
            if sims.shape[1] > pick:  # everything tied with the pick-th best stays
                kth = np.partition(sims, sims.shape[1] - pick, axis=1)[:, sims.shape[1] - pick]
                hit_q, hit_r = np.nonzero(sims >= kth[:, None])
            else:
                hit_q, hit_r = np.nonzero(np.ones(sims.shape, bool))
            qs.append(q[hit_q])
            rs.append(rows[hit_r])
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q, r = np.concatenate(qs), np.concatenate(rs)
    s = np.empty(len(q), np.float32)
    for start in range(0, len(q), 65_536):  # exact re-scoring, in pieces (bounded memory)
        part = slice(start, start + 65_536)
        s[part] = np.einsum("ij,ij->i", vectors[q[part]], matrix[r[part]].astype(np.float32))
    order = np.lexsort((searchable[r], -s, q))
    q, r, s = q[order], r[order], s[order]
    first = np.searchsorted(q, q)  # the rank of each entry within its query
    top = np.arange(len(q)) - first < want
    return q[top], r[top], s[top]


def search_lists(folder: str, pool_kind: str, modality: str, task: int, lo: int, hi: int, lists: list[int],
                 settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Candidates of the queries whose home list is in [lo, hi): see the module docstring (step 4). Writes
    ``results/<modality>/<task>.arrow`` sorted by (shard, row) and returns where each shard's rows are."""
    started = time.perf_counter()
    root = Path(folder)
    lists_dir = root / LISTS_DIR
    pool_counts = np.load(lists_dir / f"pool-counts-{pool_kind}.npy")
    homes = np.load(lists_dir / f"home-counts-{modality}.npy")
    matrix, bounds, where, groups, scores, metas = _pool_slices(lists_dir, pool_kind, lists, pool_counts)
    near = np.load(lists_dir / f"near-{modality}.npy")
    vectors, home, shards, qmeta = _queries(lists_dir, modality, lo, hi, homes)
    searchable = _column_at(metas, where, "searchable")
    q, r, s = _top_entries(vectors, home, near, lists, matrix, bounds, searchable, settings["want"])
    admissible = np.ones(len(q), bool)
    if not settings["allow_same_group"]:
        admissible &= groups[r] != qmeta["group"].to_numpy()[q]
    bound = settings["category_max_score"]
    if bound is not None:  # a target scoring above the bound for the query's own category is excluded
        from saferclip_data.stages.columns import column_part

        categories = np.asarray(qmeta["category"].to_pylist(), dtype=object)[q]
        for category in {c for c in categories.tolist() if c}:
            name = f"score_{column_part(category)}"
            if name in scores.column_names:
                values = np.asarray(scores[name].fill_null(np.nan).to_numpy(), np.float64)
                at = categories == category
                admissible[at] &= ~(values[r[at]] > bound)
    q, r, s = q[admissible], r[admissible], s[admissible]
    first = np.searchsorted(q, q)
    top = np.arange(len(q)) - first < settings["candidates"]
    q, r, s = q[top], r[top], s[top]
    keys = _column_at(metas, where[r], "key")
    cuts = np.searchsorted(q, np.arange(len(vectors) + 1))
    table = pa.table({
        "shard": pa.array(shards, pa.int32()),
        "row": qmeta["row"],
        "candidates": pa.ListArray.from_arrays(pa.array(cuts, pa.int32()), pa.array(keys, pa.string())),
        "similarities": pa.ListArray.from_arrays(pa.array(cuts, pa.int32()), pa.array(s, pa.float32())),
    })  # fmt: skip
    table = table.sort_by([("shard", "ascending"), ("row", "ascending")])
    out = lists_dir / "results" / modality
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task:06d}.arrow"
    write_arrow(path, table)
    shard_column = table["shard"].to_numpy()
    present, starts = np.unique(shard_column, return_index=True)
    ends = np.append(starts[1:], len(shard_column))
    spans = {int(sh): (int(a), int(b - a)) for sh, a, b in zip(present, starts, ends)}
    return {"path": str(path), "spans": spans, "queries": len(vectors), "pool_rows": len(matrix),
            "lists": len(lists), "seconds": round(time.perf_counter() - started, 3), **worker_identity()}  # fmt: skip


def _column_at(metas: dict[int, pa.Table], where: np.ndarray, column: str) -> list | np.ndarray:
    """``column`` of the rows at (piece, offset) pairs, in their order."""
    numeric = column == "searchable"
    out: Any = np.zeros(len(where), np.int64) if numeric else np.empty(len(where), dtype=object)
    for piece in np.unique(where[:, 0]) if len(where) else []:
        at = np.flatnonzero(where[:, 0] == piece)
        values = metas[int(piece)][column].take(pa.array(where[at, 1], pa.int64()))
        out[at] = values.to_numpy() if numeric else values.to_pylist()
    return out if numeric else out.tolist()


def write_result_index(folder: Path, modality: str, results: list[dict], shard_ids: list[str]) -> None:
    """Per shard, the (file, offset, length) slices of the task outputs holding its queries."""
    out = folder / LISTS_DIR / "results" / modality / "index"
    out.mkdir(parents=True, exist_ok=True)
    per_shard: dict[int, list] = {}
    for result in results:
        for shard, (offset, length) in result["spans"].items():
            per_shard.setdefault(int(shard), []).append([Path(result["path"]).name, offset, length])
    for index, shard_id in enumerate(shard_ids):
        atomic_write_bytes(out / f"{shard_id}.json", json.dumps(per_shard.get(index, [])).encode())


def shard_candidates(folder: Path, modality: str, shard_id: str) -> pa.Table:
    """The candidates of one shard's queries (row, candidates, similarities), sorted by row."""
    base = folder / LISTS_DIR / "results" / modality
    spans = json.loads((base / "index" / f"{shard_id}.json").read_text())
    parts = [read_arrow(base / name).slice(offset, length).select(["row", "candidates", "similarities"])
             for name, offset, length in spans]  # fmt: skip
    if not parts:
        return pa.table({"row": pa.array([], pa.int64()), "candidates": pa.array([], pa.list_(pa.string())),
                         "similarities": pa.array([], pa.list_(pa.float32()))})  # fmt: skip
    return pa.concat_tables(parts).sort_by("row").combine_chunks()

