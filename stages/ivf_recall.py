"""How many lists the ``ivf_flat`` search must probe to keep the nearest safe target: measured on every build.

The method promises each unsafe record its nearest admissible safe record over the whole pool; an IVF search finds
it only when it sits in one of the lists probed. So before the list search runs, a seeded sample of its queries is
searched exactly against every pool row, as tasks over the list-sorted pool pieces (each holds one piece and the
sample: memory stays bounded, the work spreads over the cluster). Each task returns, per sampled query and list,
the best admissible similarity in that list (own group and category bound applied as in the search). From those
the driver reads, for every probe count, the share of sampled queries whose best list-searched row is as good as
the exact best (recall@1), and picks the smallest probe count reaching the target. Where that would probe more
than half the lists, the exact search is cheaper and is used instead.

Ties: a query counts as found when the probed lists hold a row within ``TIE`` of the exact best, so the last bits
of a matrix product (which differ between a Ray task and an in-process run) cannot change the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from saferclip_data.pipeline.workdir import atomic_write_npy
from saferclip_data.stages.ivf_partitioned import LISTS_DIR, nearest_order, read_arrow, write_arrow

TIE = 1e-5
QUERY_CHUNK = 512  # sampled queries per matrix product (bounds the similarity block with ROW_BLOCK)
ROW_BLOCK = 32_768
KEEP = 4  # lists kept per sampled query and piece


def write_sample(folder: Path, modality: str, homes: np.ndarray, count: int, seed: int = 0) -> int:
    """A seeded sample of ``count`` list-search queries of ``modality`` (over every shard), written beside the
    lists as ``calib-<modality>.npy`` (vectors) and ``.arrow`` (home list, group, category); returns its size."""
    lists_dir = folder / LISTS_DIR
    totals = homes.sum(axis=1)
    picks = np.sort(np.random.default_rng(seed).choice(int(totals.sum()), min(count, int(totals.sum())), False))
    starts = np.concatenate([[0], np.cumsum(totals)])
    vectors, metas = [], []
    for shard in np.flatnonzero(totals):
        at = picks[(picks >= starts[shard]) & (picks < starts[shard + 1])] - starts[shard]
        if not len(at):
            continue
        base = lists_dir / "queries" / modality / f"{shard:06d}"
        vectors.append(np.asarray(np.load(f"{base}.npy", mmap_mode="r")[at], np.float16))
        home = np.searchsorted(np.cumsum(homes[shard]), at, side="right")
        meta = read_arrow(Path(f"{base}.arrow")).take(pa.array(at, pa.int64())).select(["group", "category"])
        metas.append(meta.append_column("home", pa.array(home, pa.int64())))
    atomic_write_npy(lists_dir / f"calib-{modality}.npy", np.concatenate(vectors))
    write_arrow(lists_dir / f"calib-{modality}.arrow", pa.concat_tables(metas))
    return len(picks)


def best_lists(folder: str, pool_kind: str, modality: str, piece: int, settings: dict[str, Any]) -> dict:
    """Over one list-sorted pool piece: each sampled query's ``KEEP`` lists holding its best admissible rows, with
    those rows' similarities (-inf: none). A few lists a query suffice: only a list within TIE of the query's
    exact best can decide whether it is found, and the reply stays small however many lists there are."""
    lists_dir = Path(folder) / LISTS_DIR
    counts = np.load(lists_dir / f"pool-counts-{pool_kind}.npy")[piece]
    queries = np.load(lists_dir / f"calib-{modality}.npy").astype(np.float32)
    qmeta = read_arrow(lists_dir / f"calib-{modality}.arrow")
    rows = np.load(lists_dir / pool_kind / f"{piece:06d}.npy", mmap_mode="r")
    meta = read_arrow(lists_dir / pool_kind / f"{piece:06d}.arrow")
    best = np.full((len(queries), len(counts)), -np.inf, np.float32)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    occupied = np.flatnonzero(counts)
    qgroup = qmeta["group"].to_numpy()
    qcategory = np.asarray(qmeta["category"].to_pylist(), dtype=object)
    start = 0
    while start < len(occupied):  # blocks of whole lists, about ROW_BLOCK rows each
        stop = start + 1
        while stop < len(occupied) and bounds[occupied[stop] + 1] - bounds[occupied[start]] <= ROW_BLOCK:
            stop += 1
        lists = occupied[start:stop]
        a, b = int(bounds[lists[0]]), int(bounds[lists[-1] + 1])
        block = np.asarray(rows[a:b], np.float32)
        excluded = _exclusions(meta.slice(a, b - a), qgroup, qcategory, settings)
        cuts = bounds[lists] - a
        for q in range(0, len(queries), QUERY_CHUNK):
            sims = queries[q : q + QUERY_CHUNK] @ block.T
            if excluded is not None:
                sims[excluded[q : q + QUERY_CHUNK]] = -np.inf
            best[q : q + QUERY_CHUNK, lists] = np.maximum.reduceat(sims, cuts, axis=1)
        start = stop
    return top_lists(best, np.broadcast_to(np.arange(len(counts)), best.shape))


def top_lists(sims: np.ndarray, lists: np.ndarray) -> dict:
    """Per row, the KEEP entries of highest similarity (their lists and similarities)."""
    keep = min(KEEP, sims.shape[1])
    at = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
    return {"sims": np.take_along_axis(sims, at, 1), "lists": np.take_along_axis(lists, at, 1).astype(np.int64)}


def merge(a: dict | None, b: dict) -> dict:
    """Two pieces' best lists, merged (the KEEP best of both)."""
    if a is None:
        return b
    return top_lists(np.concatenate([a["sims"], b["sims"]], 1), np.concatenate([a["lists"], b["lists"]], 1))


def _exclusions(meta: pa.Table, qgroup: np.ndarray, qcategory: np.ndarray, settings: dict) -> np.ndarray | None:
    """(queries, rows) True where a pool row is not admissible for a query (own group; category bound)."""
    excluded = None
    if not settings["allow_same_group"]:
        excluded = qgroup[:, None] == meta["group"].to_numpy()[None, :]
    bound = settings["category_max_score"]
    if bound is not None:
        from saferclip_data.stages.columns import column_part

        for category in {c for c in qcategory.tolist() if c}:
            name = f"score_{column_part(category)}"
            if name not in meta.column_names:
                continue
            over = np.asarray(meta[name].fill_null(np.nan).to_numpy(), np.float64) > bound
            hit = (qcategory == category)[:, None] & over[None, :]
            excluded = hit if excluded is None else excluded | hit
    return excluded


def needed_probes(best: dict, homes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per sampled query, the smallest probe count whose lists (its home's neighbourhood, nearest first, the home
    itself first) hold a row within TIE of its exact best; 0 for a query with no admissible row at all."""
    sims, lists = best["sims"], best["lists"]
    exact = sims.max(axis=1)
    out = np.zeros(len(sims), np.int64)
    for h in np.unique(homes):
        rank = np.empty(len(centroids), np.int64)
        rank[nearest_order(centroids, int(h))] = np.arange(len(centroids))
        for q in np.flatnonzero(homes == h):
            if np.isfinite(exact[q]):
                out[q] = rank[lists[q][sims[q] >= exact[q] - TIE]].min() + 1
    return out


def search_choice(needed: np.ndarray, start: int, lists: int, target: float) -> dict:
    """How to search: ``ivf_flat`` with the probe count that reaches ``target`` (and the recall measured with it),
    or ``exact`` where that would probe over half the lists; with what the configured ``start`` alone would have
    found (the reason for any raise)."""
    nprobe, recall = choose_probes(needed, start, lists, target)
    configured = {"lists": lists, "nprobe_configured": start,
                  "recall_at_1_configured": round(recall_at(needed, min(start, lists)), 6)}  # fmt: skip
    if nprobe > lists // 2 and nprobe > start:
        return {"index": "exact", "nprobe": None, "recall_at_1": 1.0, **configured}
    return {"index": "ivf_flat", "nprobe": nprobe, "recall_at_1": round(recall, 6), **configured}


def recall_at(needed: np.ndarray, nprobe: int) -> float:
    """Recall@1 on the sample when ``nprobe`` lists are probed (queries without an admissible row do not count)."""
    counted = needed[needed > 0]
    return float((counted <= nprobe).mean()) if len(counted) else 1.0


def choose_probes(needed: np.ndarray, start: int, lists: int, target: float) -> tuple[int, float]:
    """The smallest probe count >= ``start`` whose recall@1 on the sample reaches ``target``, and that recall
    (queries without any admissible row do not count)."""
    counted = needed[needed > 0]
    if not len(counted):
        return min(start, lists), 1.0
    ranked = np.sort(counted)
    required = int(ranked[min(len(ranked) - 1, int(np.ceil(target * len(ranked))) - 1)])
    nprobe = min(max(start, required), lists)
    return nprobe, recall_at(needed, nprobe)
