"""`saferclip-data bench scale`: how a build from precomputed embeddings grows with the record count.

For each size a synthetic pool is written in the LAION / clip-retrieval layout (``img_emb/``, ``text_emb/``,
``metadata/``), part by part so the writer never holds it: clustered unit vectors (as CLIP embeddings are), half
safe and half unsafe, every unsafe record a planted edit of one safe record (its known nearest safe target), and
a planted share of near-duplicate copies. The pool is then built through ``shards`` by the real CLI in a child
process (on an embedded Ray by default, so each stage's workers are processes of their own) whose process tree
is sampled for memory; per stage it reports seconds, the largest process's peak RSS
while the stage ran, records/s, and the planted truth: dedup recall (copies found), mining precision@1, and
dedup recall against the exact all-pairs path where that is feasible. Between sizes it prints the growth
exponent of each stage's time and memory (log ratio over log size ratio).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.bench.placeholder_server import PlaceholderServer
from saferclip_data.pipeline.workdir import REJECT_SCHEMA, WorkDir

#: the noise of a planted duplicate (cosine ~0.99 to its original), of an unsafe edit (~0.8 to its safe source),
#: and of a record around its cluster centre (~0.5 between two records of one cluster)
DUPLICATE_NOISE = 0.15
EDIT_NOISE = 0.6
CLUSTER_NOISE = 1.0
STAGES = ("source", "embed", "score", "filter", "dedup", "neighbours", "mine", "shards")
#: a random-init model of each width the bench can name (only its identity and prompt towers are used)
ARCH_OF_DIM = {128: "toy-vit-tiny", 384: "ViT-S-32", 512: "ViT-B-32"}


@dataclass(frozen=True)
class SyntheticPool:
    rows: int
    dim: int = 512
    shard_rows: int = 50_000
    clusters: int = 1_000
    duplicate_share: float = 0.05  # share of records that are planted copies of another record
    edit_noise: float = EDIT_NOISE  # larger: unsafe edits further from their source, nearer their neighbours
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * (scale / math.sqrt(shape[1]))


def synthetic_part(pool: SyntheticPool, index: int, centres: np.ndarray) -> dict:
    """Part ``index`` of the pool: keys ``p{part}-{row}``; rows 0..n/2 safe, n/2..n their unsafe edits (same
    order); then a share of records replaced by near-copies of another record of the same role."""
    n = min(pool.shard_rows, pool.rows - index * pool.shard_rows)
    rng = np.random.default_rng([pool.seed, index])
    keys = [f"p{index:05d}-{i:07d}" for i in range(n)]
    half = n // 2
    role = np.array(["safe"] * half + ["unsafe"] * (n - half), dtype=object)
    centre = rng.integers(0, len(centres), half)
    vectors, planted = {}, {}
    for modality in ("image", "text"):
        safe = _unit(centres[centre] + _noise(rng, (half, pool.dim), CLUSTER_NOISE))
        unsafe = _unit(safe[: n - half] + _noise(rng, (n - half, pool.dim), pool.edit_noise))
        vectors[modality] = np.concatenate([safe, unsafe])
    planted["source_of"] = {keys[half + i]: keys[i] for i in range(n - half)}
    copies = np.flatnonzero(rng.random(n) < pool.duplicate_share)
    originals = np.where(copies < half, rng.integers(0, max(1, half), len(copies)),
                         half + rng.integers(0, max(1, n - half), len(copies)))  # fmt: skip
    keep = copies != originals
    copies, originals = copies[keep], originals[keep]
    copies, originals = copies[~np.isin(originals, copies)], originals[~np.isin(originals, copies)]
    for modality in ("image", "text"):
        moved = vectors[modality][originals] + _noise(rng, (len(copies), pool.dim), DUPLICATE_NOISE)
        vectors[modality][copies] = _unit(moved)
    planted["duplicate_of"] = {keys[c]: keys[o] for c, o in zip(copies, originals)}
    for c in copies:  # a copied unsafe record, or the edit of a replaced safe one, lost its planted answer
        planted["source_of"].pop(keys[c] if c >= half else keys[min(half + c, n - 1)], None)
    return {"keys": keys, "role": role, "vectors": vectors, "planted": planted}


def _centres(pool: SyntheticPool) -> np.ndarray:
    return _unit(np.random.default_rng(pool.seed).standard_normal((pool.clusters, pool.dim)).astype(np.float32))


def write_laion(folder: Path, pool: SyntheticPool, url: str | None = None) -> dict[str, dict[str, str]]:
    """The pool as a clip-retrieval folder (one part per ``shard_rows``); returns the planted truth. ``url``: the
    image host (``<url>/<key>.jpg``); None: the records have no image (an embeddings-only pool)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    centres, truth = _centres(pool), {"source_of": {}, "duplicate_of": {}}
    for index in range(math.ceil(pool.rows / pool.shard_rows)):
        part = synthetic_part(pool, index, centres)
        np.save(folder / "img_emb" / f"img_emb_{index}.npy", part["vectors"]["image"].astype(np.float16))
        np.save(folder / "text_emb" / f"text_emb_{index}.npy", part["vectors"]["text"].astype(np.float16))
        punsafe = np.where(part["role"] == "unsafe", 0.9, 0.1)
        urls = [f"{url}/{k}.jpg" for k in part["keys"]] if url else pa.nulls(len(part["keys"]), pa.string())
        meta = pa.table({"key": part["keys"], "caption": [f"record {k}" for k in part["keys"]],
                         "url": pa.array(urls, pa.string()), "punsafe": punsafe})  # fmt: skip
        pq.write_table(meta, folder / "metadata" / f"metadata_{index}.parquet")
        for name in truth:
            truth[name].update(part["planted"][name])
    return truth


def write_pool(root: Path, pool: SyntheticPool) -> dict[str, str]:
    """The pool written straight into a work dir as completed ``embed`` and ``filter`` stages (for driving the
    dedup stage alone); returns planted duplicate -> original."""
    wd = WorkDir(root)
    centres = _centres(pool)
    shards = [f"part-{i:05d}" for i in range(math.ceil(pool.rows / pool.shard_rows))]
    planted: dict[str, str] = {}
    for index, shard in enumerate(shards):
        part = synthetic_part(pool, index, centres)
        n = len(part["keys"])
        fsl = {m: pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).reshape(-1)), pool.dim)
               for m, v in part["vectors"].items()}  # fmt: skip
        embed = pa.table({"key": part["keys"], "image_embedding": fsl["image"], "text_embedding": fsl["text"]})
        filt = pa.table({"key": part["keys"], "role": pa.array(part["role"], pa.string()), "category": [None] * n})
        for stage, table in (("embed", embed), ("filter", filt)):
            stats = {"shard": shard, "in": n, "out": n, "rejected": 0, "seconds": 0.0, "metadata": {}}
            wd.write_shard(stage, shard, table, REJECT_SCHEMA.empty_table(), stats, {})
        planted.update(part["planted"]["duplicate_of"])
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


def recipe(folder: Path, work: Path, pool: SyntheticPool, images: bool = False) -> dict:
    """The build the bench measures: the pool through shards, with a 512-d model named (random init: only its
    identity and prompt towers are used, the vectors come from the files)."""
    return {
        "name": "scale",
        "workdir": str(work),
        "source": {"kind": "embeddings", "path": str(folder), "shard_size": pool.shard_rows,
                   **({"download": {"image_size": 64, "threads": 16, "timeout": 20}} if images else {})},
        "model": {"arch": ARCH_OF_DIM[pool.dim], "pretrained": None},
        "stages": {
            "embed": {},
            "score": {"role_column": "label"},
            "filter": {"role_from": "labels"},
            "dedup": {"by": ["image"]},
            "neighbours": {"modalities": ["text"], "candidates": 16},
            "mine": {"k": 4, "reuse_cap": 16},
            "shards": {"plain_view": images, "samples_per_shard": 10_000},
        },
    }


def _monitor(proc: subprocess.Popen, every: float = 0.25) -> list[tuple[float, float, str]]:
    """(time, RSS MB, name) of the largest process in the tree, sampled until ``proc`` ends. The name is the
    process title (Ray sets ``ray::<task or actor method>``), so a peak can be traced to its stage's step."""
    import psutil

    samples = []
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        largest, name = 0.0, ""
        for p in [root, *root.children(recursive=True)]:
            try:
                rss = p.memory_info().rss / 2**20
                if rss > largest:
                    largest, name = rss, " ".join(p.cmdline()[:1]) or p.name()
            except psutil.Error:
                pass
        samples.append((time.time(), largest, name))
        time.sleep(every)
    return samples


def measure(size: int, dim: int, base: Path, exact_dedup_max: int, executor: str = "ray",
            exact_sample: int = 0, images: bool = False, edit_noise: float = EDIT_NOISE,
            cluster_size: int = 2_000) -> dict:  # fmt: skip
    """Build one size; per stage seconds, peak RSS (MB) and records/s, plus the planted-truth figures."""
    import yaml

    pool = SyntheticPool(rows=size, dim=dim, shard_rows=min(50_000, max(1_000, size // 8)),
                         clusters=max(20, size // cluster_size), edit_noise=edit_noise)  # fmt: skip
    folder, work = base / f"pool-{size}", base / f"work-{size}"
    path = base / f"scale-{size}.yaml"
    command = [sys.executable, "-m", "saferclip_data.cli.main", "build", str(path), "--executor", executor,
               "--no-progress"]  # fmt: skip
    with PlaceholderServer() if images else nullcontext() as url:
        truth = write_laion(folder, pool, url)
        path.write_text(yaml.safe_dump(recipe(folder, work, pool, images=images)))
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = _monitor(proc)
        err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"build of {size:,} records failed: {err.strip().splitlines()[-1:]}")
    wd = WorkDir(work)
    result = {"records": size, "dim": dim, "executor": executor, "stages": {},
              "peak_rss_mb": max((m for _, m, _ in samples), default=0)}  # fmt: skip
    for stage in STAGES:
        manifest = wd.manifest(stage)
        end = (wd.stage_dir(stage) / "_manifest.json").stat().st_mtime
        seconds = manifest["seconds"]
        during = [(m, name) for t, m, name in samples if end - seconds - 0.5 <= t <= end + 0.5]
        peak, peak_process = max(during, default=(0.0, ""))
        result["stages"][stage] = {"seconds": seconds, "peak_rss_mb": round(peak, 1), "peak_process": peak_process,
                                   "records_per_s": round(manifest["counts"]["in"] / max(seconds, 1e-9))}  # fmt: skip
    result |= truth_figures(wd, truth)
    result["target_search"] = json.loads(wd.manifest("neighbours")["metadata"].get("search", "null"))
    if exact_sample:
        result |= exact_sample_precision(wd, truth, exact_sample)
    if size <= exact_dedup_max:
        result["dedup_recall_vs_exact"] = exact_recall(wd, path)
        result |= other_index_precision(wd, path, truth, command)
    return result


def other_index_precision(wd: WorkDir, path: Path, truth: dict, command: list[str]) -> dict:
    """Mining precision@1 with the neighbours index the build did not use (IVF where it searched exactly, and
    the reverse): the same work dir rebuilt from neighbours on."""
    import yaml

    used = json.loads((wd.stage_dir("neighbours") / "_pool" / "pool.json").read_text())["search"]["text"]["index"]
    other = "ivf_flat" if used == "exact" else "exact"
    data = yaml.safe_load(path.read_text())
    data["stages"]["neighbours"]["index"] = other
    path.with_name(path.stem + f"-{other}.yaml").write_text(yaml.safe_dump(data))
    subprocess.run([*command[:4], str(path.with_name(path.stem + f"-{other}.yaml")), *command[5:]], check=True,
                   capture_output=True)  # fmt: skip
    figures = truth_figures(wd, truth)
    return {"index": used, f"mining_precision_at_1_{other}": figures["mining_precision_at_1"]}


def exact_sample_precision(wd: WorkDir, truth: dict, sample: int, seed: int = 0) -> dict:
    """Mining precision@1 of an exact search over the build's own safe pool, on ``sample`` unsafe queries drawn
    from those the build mined (the planted source kept): the ceiling the build's search is held to, affordable
    at any size since the pool is read piece by piece."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from saferclip_data.stages.columns import unit_rows

    rejected = {r["key"] for r in wd.rejects("dedup").to_pylist()}
    mined = wd.read_stage_columns("mine", ["key", "text_targets"]).to_pylist()
    queries = sorted(r["key"] for r in mined if r["text_targets"] and truth["source_of"].get(r["key"]) is not None
                     and truth["source_of"][r["key"]] not in rejected)  # fmt: skip
    picked = sorted(np.random.default_rng(seed).choice(queries, min(sample, len(queries)), replace=False).tolist())
    files = sorted(str(p) for p in wd.stage_dir("embed").glob("part-[0-9]*.parquet"))
    table = ds.dataset(files).to_table(columns=["key", "text_embedding"], filter=pc.field("key").isin(picked))
    vectors, _ = unit_rows(table["text_embedding"], table.schema.field("text_embedding").type.list_size)
    folder = wd.stage_dir("neighbours") / "_pool"
    pieces = json.loads((folder / "pool.json").read_text())["pieces"]
    best, best_key = np.full(len(vectors), -np.inf), np.empty(len(vectors), dtype=object)
    for i in range(pieces):
        rows = np.load(folder / "text" / f"{i:06d}.npy", mmap_mode="r")
        keys = pq.read_table(folder / "keys" / f"{i:06d}.parquet", columns=["key"])["key"].to_numpy(False)
        keys = keys[np.load(folder / "text" / f"{i:06d}.rows.npy")]
        for start in range(0, len(rows), 65_536):
            sims = vectors @ np.asarray(rows[start : start + 65_536], np.float32).T
            top = sims.argmax(axis=1)
            better = sims[np.arange(len(vectors)), top] > best
            best[better] = sims[np.arange(len(vectors)), top][better]
            best_key[better] = keys[start + top[better]]
    hits = sum(best_key[i] == truth["source_of"][k] for i, k in enumerate(table["key"].to_pylist()))
    return {"exact_sample_precision_at_1": hits / max(1, len(vectors)), "exact_sample_queries": len(vectors)}


def truth_figures(wd: WorkDir, truth: dict[str, dict[str, str]]) -> dict:
    """Dedup recall of the planted copies (a copy or its original rejected as the other's duplicate, or both
    under one kept record) and mining precision@1 (top-1 text target = the planted source, where it is kept)."""
    rejected = {r["key"]: r["error"].split()[1] for r in wd.rejects("dedup").to_pylist()}

    def rep(key: str) -> str:
        return rejected.get(key, key)

    pairs = truth["duplicate_of"]
    found = sum(rep(c) == rep(o) for c, o in pairs.items())
    mined = wd.read_stage_columns("mine", ["key", "text_targets"]).to_pylist()
    hits = total = 0
    for row in mined:
        source = truth["source_of"].get(row["key"])
        if source is None or source in rejected or not row["text_targets"]:
            continue
        total += 1
        hits += row["text_targets"][0] == source
    return {"dedup_planted_recall": found / max(1, len(pairs)), "mining_precision_at_1": hits / max(1, total),
            "mining_queries": total}  # fmt: skip


def exact_recall(wd: WorkDir, recipe_path: Path) -> float:
    """Share of the all-pairs search's duplicate pairs (the stage with one partition per role) that the build's
    dedup also found."""
    import yaml

    from saferclip_data.pipeline.executors import LocalExecutor
    from saferclip_data.pipeline.worker import StageJob
    from saferclip_data.stages.dedup import DedupConfig, DedupStage

    partitioned = {r["key"]: r["error"].split()[1] for r in wd.rejects("dedup").to_pylist()}
    config = yaml.safe_load(recipe_path.read_text())["stages"]["dedup"] | {"partition_rows": 10**12, "spill_margin": 0}
    exact_root = wd.root.with_name(wd.root.name + "-exact")
    for stage in ("filter", "embed"):  # the exact run reads the same inputs, written to its own folder
        (exact_root / stage).parent.mkdir(parents=True, exist_ok=True)
        if not (exact_root / stage).exists():
            (exact_root / stage).symlink_to(wd.stage_dir(stage))
    LocalExecutor().run_global(StageJob(DedupStage, DedupConfig(**config), {}, str(exact_root)))
    exact = {}
    for path in sorted((exact_root / "dedup").glob("*.rejects.parquet")):
        exact |= {r["key"]: r["error"].split()[1] for r in pq.read_table(path).to_pylist()}

    def rep(key: str) -> str:
        return partitioned.get(key, key)

    return sum(rep(d) == rep(k) for d, k in exact.items()) / max(1, len(exact))


def growth(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage, the exponent of time and of peak memory between the smallest and the largest size."""
    if len(results) < 2:
        return {}
    a, b = results[0], results[-1]
    scale = math.log(b["records"] / a["records"])
    out = {}
    for stage in STAGES:
        sa, sb = a["stages"][stage], b["stages"][stage]
        out[stage] = {k: round(math.log(max(sb[k], 1e-3) / max(sa[k], 1e-3)) / scale, 2)
                      for k in ("seconds", "peak_rss_mb")}  # fmt: skip
    return out


def save(results: list[dict], out: Path) -> None:
    out.write_text(json.dumps({"results": results, "growth": growth(results)}, indent=2) + "\n")
