"""The neighbours stage: for each unsafe record, its nearest safe records over the whole safe pool.

This is the distributed half of mining. ``prepare`` writes the safe pool - every safe record that survived
filter and dedup, minus benchmark splits - as one piece per shard (tasks on the build's executor; see
:mod:`safe_pool`); each worker memory-maps the pieces once, and the unsafe queries of each shard are searched
against them exactly (see :mod:`knn`) up to ``exact_max_rows`` pool rows. Above, ``ivf_flat`` (the default)
searches inverted lists kept on disk in tasks that each hold a bounded share of pool and queries (see
:mod:`ivf_partitioned`), and ``ivf_pq`` a faiss index of compact codes in every worker (see :mod:`ivf`; its
recall is measured by ``bench knn``). Exclusions that depend on the query (its own group,
category compatibility) are applied here, so the ``candidates`` kept per query are all admissible; the ``mine``
stage then picks the final targets under the global reuse cap.

Modalities: ``text`` (caption -> safe caption, the paper's choice), ``image`` (image -> safe image), and the
cross-modal ``text-image`` (caption -> safe image) and ``image-text``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from saferclip_data.pipeline.errors import UserError
from saferclip_data.pipeline.stage import BatchResult, ShardSpec, Stage, StageConfig
from saferclip_data.pipeline.workdir import WorkDir, atomic_path, atomic_write_bytes, atomic_write_npy, remove_tree
from saferclip_data.stages import ivf_partitioned as lists
from saferclip_data.stages import ivf_recall
from saferclip_data.stages.columns import column_part, fields, schema, unit_rows
from saferclip_data.stages.ivf import build_ivf, default_nlist, search_ivf
from saferclip_data.stages.knn import knn_search
from saferclip_data.stages.safe_pool import RowView, SafePool, group_hash, piece_blocks, pool_piece

Modality = Literal["text", "image", "text-image", "image-text"]
POOL_DIR = "_pool"
#: index: auto switches from the exact search to IVF above this many pool rows (a modality's searchable rows)
EXACT_MAX_ROWS = 200_000
PQ_BYTES = 64
NPROBE = 16
IVF_SAMPLE_PER_LIST = 32  # pool rows sampled per IVF list to train its k-means
MIN_RECALL = 0.995


def build_pool_index(folder: str, kind: str, index_kind: str, count: int, rows: int, nlist: int,
                     pq_bytes: int) -> None:  # fmt: skip
    """The pool's IVF index of one embedding kind, trained on a seeded sample and filled piece by piece."""
    import faiss

    root = Path(folder)
    pieces = [np.load(root / kind / f"{i:06d}.npy", mmap_mode="r") for i in range(count)]
    rng = np.random.default_rng(0)
    share = min(1.0, IVF_SAMPLE_PER_LIST * nlist / rows)
    sample = np.concatenate([np.asarray(p[rng.random(len(p)) < share], np.float32) for p in pieces])
    index = build_ivf(piece_blocks(pieces, 65_536), sample, index_kind, nlist, pq_bytes)
    with atomic_path(root / f"{kind}.ivf") as tmp:
        faiss.write_index(index, str(tmp))


def query_and_pool(modality: str) -> tuple[str, str]:
    """Which embedding the query uses and which the pool uses: ``text-image`` = caption query, image pool."""
    query, _, pool = modality.partition("-")
    return query, pool or query


class NeighboursConfig(StageConfig):
    batch_size: int = Field(default=4096, gt=0, le=1 << 24)
    gpus: float | Literal["auto"] = "auto"
    modalities: list[Modality] = Field(
        default_factory=lambda: ["text"],
        min_length=1,
        description="text (the paper's choice), image, text-image, image-text",
    )
    candidates: int = Field(default=32, gt=0, description="admissible safe candidates kept per query and modality")
    allow_same_group: bool = Field(
        default=False, description="may a record's own group (its quadruplet's safe partner) be a target?"
    )
    group_column: str = Field(default="group", description="source column with the group id")
    exclude_splits: list[str] = Field(
        default_factory=list, description="values of split_column whose safe records are never targets (benchmarks)"
    )
    split_column: str = "split"
    pair_column: str | None = Field(
        default=None, description="source column naming the given safe partner (ViSU-style), for the margin"
    )
    category_max_score: float | None = Field(
        default=None, description="exclude safe targets scoring above this for the query's own category"
    )
    backend: Literal["auto", "faiss", "torch"] = "auto"
    block_rows: int = Field(default=262_144, gt=0, description="pool rows per search block (bounds memory)")
    index: Literal["auto", "exact", "ivf_flat", "ivf_pq"] | None = Field(
        default=None,
        description="exact = every query scans the pool; ivf_flat = inverted lists on disk searched by tasks, "
        "exact cosines (no process holds the pool); ivf_pq = a faiss index of product-quantised codes in each "
        "worker, candidates re-scored exactly; unset = auto: exact up to exact_max_rows, ivf_flat above",
    )
    exact_max_rows: int | None = Field(
        default=None, gt=0, description=f"auto's switch to ivf_flat (unset: {EXACT_MAX_ROWS:,} pool rows)"
    )
    nlist: int | None = Field(default=None, gt=0, description="IVF lists (unset: about 2 * sqrt(pool rows))")
    nprobe: int | None = Field(
        default=None, gt=0, description=f"IVF lists searched per query (ivf_flat: the lists nearest the query's own "
        f"list; unset: {NPROBE})"
    )
    pq_bytes: int | None = Field(default=None, gt=0, description=f"ivf_pq: code bytes per vector (unset: {PQ_BYTES})")
    task_queries: int = Field(default=20_000, gt=0, description="ivf_flat: queries per search task (bounds memory)")
    task_pool_rows: int = Field(
        default=100_000, gt=0, description="ivf_flat: pool rows a search task holds (the lists its queries probe)"
    )
    min_recall: float | None = Field(
        default=MIN_RECALL, gt=0, le=1, description="ivf_flat: recall@1 against the exact search that the probe "
        "count must reach, measured on sampled queries every build; probes are added until it does (the exact "
        "search is used where that would probe over half the lists); null: probe nprobe lists, unmeasured"
    )
    recall_queries: int = Field(default=2_000, gt=0, description="ivf_flat: queries sampled to measure recall@1")

    RUNTIME_FIELDS = StageConfig.RUNTIME_FIELDS | {"backend", "block_rows", "task_queries", "task_pool_rows"}


class NeighboursStage(Stage):
    name = "neighbours"
    Config = NeighboursConfig
    inputs = {"dedup": ("key", "role", "category"), "embed": ("key", "image_embedding", "text_embedding")}
    output_columns = ("key", "role", "category")
    version = "3"  # 3: list search probes until min_recall, recorded in the metadata

    config: NeighboursConfig

    def output_schema(self) -> pa.Schema:
        return schema(fields("key", "role", "category", "given_pair"),
                      fields("{m}_candidates", "{m}_similarities", "{m}_pair_similarity", m=self.config.modalities))

    def _source_columns(self) -> tuple[str, ...]:
        c = self.config
        cols = [c.group_column]
        if c.exclude_splits:
            cols.append(c.split_column)
        if c.pair_column:
            cols.append(c.pair_column)
        return tuple(dict.fromkeys(cols))

    def _inputs(self) -> dict[str, tuple[str, ...]]:
        return {**self.inputs, "source": ("key", *self._source_columns())}

    # ---- driver: the shared safe pool --------------------------------------------------------------------
    def prepare(self, progress, workdir: WorkDir) -> None:
        """Write the safe pool as one piece per dedup shard (tasks on the build's executor: no process holds the
        pool), then, for an IVF index, train it on a sample and fill it piece by piece."""
        c = self.config
        shard_ids = workdir.completed_shards("dedup")
        source_cols = set(workdir.shard_columns("source", shard_ids[0])) if shard_ids else set()
        missing = [col for col in self._source_columns() if col not in source_cols]
        if missing:
            raise UserError(f"stages.neighbours: source has no column '{missing[0]}' (add it to source.extra_columns)")
        folder = workdir.stage_dir(self.name) / POOL_DIR
        remove_tree(folder)
        folder.mkdir(parents=True)
        kinds = self.pool_kinds()
        settings = c.model_dump()
        items = [(str(workdir.root), self._inputs(), settings, kinds, s, i) for i, s in enumerate(shard_ids)]
        pieces = self._rounds(progress, "write safe pool", pool_piece, items)
        workdir.write_task_log(self.name, "pool", [{k: p[k] for k in ("rows", "pid", "node")} for p in pieces])
        if sum(p["rows"] for p in pieces) == 0:
            raise UserError("stage neighbours: the safe pool is empty (no safe record left after filter and dedup)")
        info = {"pieces": len(pieces), "rows": [p["rows"] for p in pieces], "dim": pieces[0]["dim"],
                "valid": {kind: [p["valid"][kind] for p in pieces] for kind in kinds}, "index": {},
                "search": {}}  # fmt: skip
        for kind in kinds:
            rows = sum(info["valid"][kind])
            info["index"][kind] = self.index_kind(rows)
            if info["index"][kind] == "ivf_flat" and rows:
                self._assign_lists(progress, folder, kind, info)
            elif info["index"][kind] == "ivf_pq" and rows:
                built = progress.subtask(f"build ivf_pq index ({kind})", 1)
                self._build_index(folder, kind, info["index"][kind], len(pieces), rows)
                built(1)
        for modality in c.modalities:
            pool_kind = query_and_pool(modality)[1]
            info["search"][modality] = {"index": info["index"][pool_kind], "nprobe": None, "recall_at_1": None,
                                        "recall_queries": 0}  # fmt: skip
            if info["index"][pool_kind] == "ivf_flat" and sum(info["valid"][pool_kind]):
                info["search"][modality] = self._search_lists(progress, workdir, folder, modality, shard_ids,
                                                              sum(info["valid"][pool_kind]))  # fmt: skip
        for sorted_copy in [*(folder / lists.LISTS_DIR / kind for kind in kinds), folder / lists.LISTS_DIR / "queries"]:
            remove_tree(sorted_copy)  # the list-sorted copies of pool and queries: done with
        atomic_write_bytes(folder / "pool.json", json.dumps(info).encode())

    def finalize(self, workdir: WorkDir, shard_ids: list[str]) -> None:
        """Every shard has its candidates: the list search's outputs are no longer needed."""
        remove_tree(workdir.stage_dir(self.name) / POOL_DIR / lists.LISTS_DIR / "results")

    def _assign_lists(self, progress, folder: Path, kind: str, info: dict) -> None:
        """ivf_flat: train the lists on a sample (a task), then sort every pool piece by list (a task each)."""
        c = self.config
        rows = sum(info["valid"][kind])
        nlist = min(c.nlist or default_nlist(rows), rows)
        step = progress.subtask(f"train {nlist:,} IVF lists ({kind})", 1)
        self.task_map(lists.train_lists, [(str(folder), kind, len(info["rows"]), rows, nlist, IVF_SAMPLE_PER_LIST)])
        step(1)
        first_rows = np.cumsum([0, *info["rows"]])
        first_searchable = np.cumsum([0, *info["valid"][kind]])
        items = [(str(folder), kind, i, int(first_rows[i]), int(first_searchable[i])) for i in range(len(info["rows"]))]
        counts = self._rounds(progress, f"sort the pool by list ({kind})", lists.assign_pool_piece, items)
        atomic_write_npy(folder / lists.LISTS_DIR / f"pool-counts-{kind}.npy", np.stack(counts))

    def _search_lists(self, progress, workdir: WorkDir, folder: Path, modality: str, shard_ids: list[str],
                      pool_rows: int) -> None:  # fmt: skip
        """ivf_flat: assign every shard's queries to lists, then search runs of lists as tasks (bounded memory)."""
        c = self.config
        query_kind, pool_kind = query_and_pool(modality)
        items = [(str(workdir.root), self._inputs(), c.group_column, modality, query_kind, pool_kind, i, s)
                 for i, s in enumerate(shard_ids)]  # fmt: skip
        homes = np.stack(self._rounds(progress, f"assign queries to lists ({modality})", lists.assign_query_shard,
                                      items))  # fmt: skip
        lists_dir = folder / lists.LISTS_DIR
        atomic_write_npy(lists_dir / f"home-counts-{modality}.npy", homes)
        centroids = np.load(lists_dir / f"centroids-{pool_kind}.npy")
        search = self._probes(progress, folder, modality, pool_kind, homes, centroids)
        if search["index"] == "exact":
            return search
        near = lists.neighbourhoods(centroids, search["nprobe"])
        atomic_write_npy(lists_dir / f"near-{modality}.npy", near)
        pool_counts = np.load(lists_dir / f"pool-counts-{pool_kind}.npy").sum(axis=0)
        plan = lists.plan_tasks(homes.sum(axis=0), pool_counts, near, c.task_queries, c.task_pool_rows)
        settings = {"want": min(c.candidates + 8, pool_rows), "candidates": c.candidates,
                    "allow_same_group": c.allow_same_group, "category_max_score": c.category_max_score}  # fmt: skip
        tasks = [(str(folder), pool_kind, modality, t, lo, hi, probed, settings)
                 for t, (lo, hi, probed) in enumerate(plan)]  # fmt: skip
        results = self._rounds(progress, f"search lists ({modality})", lists.search_lists, tasks)
        lists.write_result_index(folder, modality, results, shard_ids)
        fields = ("path", "queries", "pool_rows", "lists", "seconds", "pid", "node")
        workdir.write_task_log(self.name, f"search-{modality}", [{k: r[k] for k in fields} for r in results])
        return search

    def _probes(self, progress, folder: Path, modality: str, pool_kind: str, homes: np.ndarray,
                centroids: np.ndarray) -> dict:  # fmt: skip
        """How many lists to probe: the fewest (from nprobe up) whose recall@1 against the exact search, measured
        on sampled queries as tasks over the pool pieces, reaches min_recall; the exact search where that is over
        half the lists (see :mod:`ivf_recall`)."""
        c = self.config
        nlist = len(centroids)
        start = min(c.nprobe or NPROBE, nlist)
        if c.min_recall is None:
            return {"index": "ivf_flat", "nprobe": start, "recall_at_1": None, "recall_queries": 0}
        sampled = ivf_recall.write_sample(folder, modality, homes, c.recall_queries)
        settings = {"allow_same_group": c.allow_same_group, "category_max_score": c.category_max_score}
        pieces = len(np.load(folder / lists.LISTS_DIR / f"pool-counts-{pool_kind}.npy"))
        items = [(str(folder), pool_kind, modality, piece, settings) for piece in range(pieces)]
        best = None
        for part in self._rounds(progress, f"measure recall@1 ({modality})", ivf_recall.best_lists, items, merge=True):
            best = ivf_recall.merge(best, part)
        sample_homes = lists.read_arrow(folder / lists.LISTS_DIR / f"calib-{modality}.arrow")["home"].to_numpy()
        needed = ivf_recall.needed_probes(best, sample_homes, centroids)
        return {**ivf_recall.search_choice(needed, start, nlist, c.min_recall), "recall_queries": sampled}

    def _rounds(self, progress, what: str, fn, items: list[tuple], merge: bool = False):
        """``fn`` over ``items`` as tasks, in rounds of 64 so that the progress bar moves; ``merge``: yield the
        results round by round instead of collecting them (the caller folds them in)."""
        advance = progress.subtask(what, len(items))

        def rounds():
            for start in range(0, len(items), 64):
                yield from self.task_map(fn, items[start : start + 64], 1.0)
                advance(len(items[start : start + 64]))

        return rounds() if merge else list(rounds())

    def pool_kinds(self) -> list[str]:
        return sorted({query_and_pool(m)[1] for m in self.config.modalities})

    def index_kind(self, pool_rows: int) -> str:
        """exact, ivf_flat or ivf_pq for a pool of this many searchable rows (auto: exact up to exact_max_rows)."""
        c = self.config
        if c.index and c.index != "auto":
            return c.index
        return "exact" if pool_rows <= (c.exact_max_rows or EXACT_MAX_ROWS) else "ivf_flat"

    def _build_index(self, folder: Path, kind: str, index_kind: str, count: int, rows: int) -> None:
        """Train and fill the IVF index in a task (a Ray worker on a cluster), so the driver never holds it."""
        c = self.config
        nlist = min(c.nlist or default_nlist(rows), rows)
        task = (str(folder), kind, index_kind, count, rows, nlist, c.pq_bytes or PQ_BYTES)
        self.task_map(build_pool_index, [task], 1.0)

    # ---- worker ------------------------------------------------------------------------------------------
    def output_metadata(self) -> dict[str, str]:
        """Per modality how it was searched: index, lists probed and the recall@1 measured against the exact
        search (from the pool's description, read with the first shard)."""
        search = getattr(self, "search_info", None)
        return {"search": json.dumps(search, sort_keys=True)} if search else {}

    def read_shard(self, spec: ShardSpec, workdir: WorkDir) -> pa.Table:
        """The shard's rows; for modalities searched by list (ivf_flat), the candidates found in ``prepare``
        joined on as ``_listed_keys_<modality>`` and ``_listed_sims_<modality>``. The pool itself is loaded only
        where a search or a given pair's similarity needs it."""
        folder = workdir.stage_dir(self.name) / POOL_DIR
        if getattr(self, "listed", None) is None:
            info = json.loads((folder / "pool.json").read_text())
            self.search_info = info["search"]
            self.listed = {m for m in self.config.modalities if info["search"][m]["index"] == "ivf_flat"
                           and sum(info["valid"][query_and_pool(m)[1]])}  # fmt: skip
            self.pool = None
        if self.pool is None and (self.config.pair_column or len(self.listed) < len(self.config.modalities)):
            self.pool = SafePool.load(folder, self.pool_kinds())
        table = workdir.read_aligned(spec.shard_id, self._inputs())
        for modality in sorted(self.listed):
            found = lists.shard_candidates(folder, modality, spec.shard_id)
            at = np.full(table.num_rows, -1, np.int64)
            at[found["row"].to_numpy()] = np.arange(found.num_rows)
            take = pa.array(at, pa.int64(), mask=at < 0)
            table = table.append_column(f"_listed_keys_{modality}", found["candidates"].take(take))
            table = table.append_column(f"_listed_sims_{modality}", found["similarities"].take(take))
        return table

    def _search(self, kind: str, queries: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        pool = self.pool.kinds[kind]
        if pool.index is None:
            return knn_search(queries, pool.blocks(c.block_rows), want, backend=c.backend, block_rows=c.block_rows)
        # ivf_pq: PQ codes rank approximately; the candidates are re-scored from the mapped pieces
        return search_ivf(pool.index, RowView(pool), queries, want, c.nprobe or NPROBE, pool.index_kind)

    def process_batch(self, batch: pa.Table) -> BatchResult:
        c = self.config
        n = batch.num_rows
        roles = batch["role"].to_pylist()
        queries = [i for i in range(n) if roles[i] == "unsafe"]
        groups = group_hash(batch[c.group_column].to_pylist())
        categories = batch["category"].to_pylist()
        pairs = batch[c.pair_column].to_pylist() if c.pair_column else [None] * n
        dim = batch.schema.field("text_embedding").type.list_size
        columns: dict[str, pa.Array] = {
            "key": batch["key"],
            "role": batch["role"],
            "category": batch["category"],
            "given_pair": pa.array(pairs, pa.string()),
        }
        for modality in c.modalities:
            query_kind, pool_kind = query_and_pool(modality)
            vectors, valid = unit_rows(batch[f"{query_kind}_embedding"], dim)
            pool = self.pool.kinds[pool_kind] if self.pool is not None else None
            cand_keys: list[list[str] | None] = [None] * n
            cand_sims: list[list[float] | None] = [None] * n
            pair_sims: list[float | None] = [None] * n
            searchable = [i for i in queries if valid[i]]
            if modality in self.listed:
                cand_keys = batch[f"_listed_keys_{modality}"].to_pylist()
                cand_sims = batch[f"_listed_sims_{modality}"].to_pylist()
                for row in searchable:
                    pair = self._searchable_row(pool_kind, pairs[row]) if pool is not None else None
                    if pair is not None:
                        pair_sims[row] = float(vectors[row] @ np.asarray(pool.rows(np.array([pair]))[0], np.float32))
            elif searchable and len(pool):
                # a little slack for the exclusions applied after the search (own group, category)
                sims, idx = self._search(pool_kind, vectors[searchable], min(c.candidates + 8, len(pool)))
                for row, srow, irow in zip(searchable, sims, idx):
                    keys_out, sims_out = [], []
                    for s, j in zip(srow, irow):
                        if j < 0:
                            continue
                        pool_row = int(pool.pool_rows[j])
                        if not self._admissible(pool_row, groups[row], categories[row]):
                            continue
                        keys_out.append(self.pool.key(pool_row))
                        sims_out.append(float(s))
                        if len(keys_out) == c.candidates:
                            break
                    cand_keys[row], cand_sims[row] = keys_out, sims_out
                    pair = self._searchable_row(pool_kind, pairs[row])
                    if pair is not None:
                        pair_sims[row] = float(vectors[row] @ np.asarray(pool.rows(np.array([pair]))[0], np.float32))
            name = column_part(modality)
            columns[f"{name}_candidates"] = pa.array(cand_keys, pa.list_(pa.string()))
            columns[f"{name}_similarities"] = pa.array(cand_sims, pa.list_(pa.float32()))
            columns[f"{name}_pair_similarity"] = pa.array(pair_sims, pa.float32())
        return BatchResult(pa.table(columns))

    def _searchable_row(self, kind: str, key: str | None) -> int | None:
        """The searchable row of the pool record ``key`` in this kind (None: not in the pool, or no vector)."""
        pool_row = self.pool.position(key) if key else None
        if pool_row is None:
            return None
        rows = self.pool.kinds[kind].pool_rows
        at = int(np.searchsorted(rows, pool_row))
        return at if at < len(rows) and rows[at] == pool_row else None

    def _admissible(self, pool_row: int, group: int, category: str | None) -> bool:
        c = self.config
        if not c.allow_same_group and self.pool.groups[pool_row] == group:
            return False
        if c.category_max_score is not None and category:
            score = self.pool.category_score(pool_row, category)
            if score is not None and score > c.category_max_score:
                return False
        return True
