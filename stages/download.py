"""URL images fetched with img2dataset into WebDataset shards, before the source stage reads them.

Each build attempt downloads the URLs that have no successful download yet into ``WORKDIR/downloads/
attempt-N/task-M/`` (img2dataset's tars plus its per-shard parquet with ``status`` and ``error_message`` for
every URL, successful or not): a task per ``samples_per_shard`` URLs, spread over the cluster's nodes by the
build's executor, each noted with its node in ``attempt-N/tasks.json``. ``index.parquet`` then maps each
record key to its latest outcome and, on success, to the byte range of its image inside the tar. The source
stage reads images from there and turns every failure into a reject carrying img2dataset's status and
message. A later ``build`` retries the failed URLs (up to ``rerun_attempts`` more times): the attempt it wants
is part of the source's fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from saferclip_data.pipeline.stage import serial_map, worker_identity
from saferclip_data.pipeline.workdir import atomic_path, atomic_write_bytes, remove_tree

KEY_COLUMN = "saferclip_key"  # our record key, carried through img2dataset as an additional column
INDEX_COLUMNS = ("key", "url", "status", "error", "attempt", "tar", "offset", "size")


class DownloadOptions(BaseModel):
    """``source.download``: fetch http(s) image URLs with img2dataset (resized and re-encoded) before reading."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(default=256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=1, le=100)
    timeout: float = Field(default=10.0, gt=0, description="seconds per URL")
    retries: int = Field(default=0, ge=0, description="img2dataset's retries of a URL within one attempt")
    rerun_attempts: int = Field(default=2, ge=0, description="later builds retry failed URLs this many times")
    processes: int = Field(default=1, gt=0)
    threads: int = Field(default=32, gt=0)
    samples_per_shard: int = Field(default=10000, gt=0, description="URLs per img2dataset task (and per tar)")

    RUNTIME: ClassVar[tuple[str, ...]] = ("timeout", "retries", "rerun_attempts", "processes", "threads")

    def result_settings(self) -> dict:
        """The settings that change the images (for the fingerprint)."""
        return self.model_dump(exclude=set(self.RUNTIME) | {"samples_per_shard"})


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def read_index(folder: Path, keys: list[str] | None = None) -> pa.Table | None:
    """The download index, or only the rows of ``keys`` (a shard reads its own rows, not the whole index)."""
    path = folder / "index.parquet"
    if not path.is_file():
        return None
    return pq.read_table(path, filters=[("key", "in", keys)] if keys is not None else None)


def attempts_done(folder: Path) -> int:
    return len([p for p in folder.glob("attempt-*") if (p / "done").is_file()]) if folder.is_dir() else 0


def wanted_attempt(folder: Path, options: DownloadOptions, urls: Callable[[], dict[str, str]]) -> int:
    """The attempt this build should have run: one more while URLs lack a success (a first download, a grown
    URL list, or failures with retries left), else the last one done. Stable between builds, so it can sit in
    the fingerprint. ``urls`` (key -> URL) is only asked for once something was downloaded, so that ``plan``
    and ``validate`` never read a remote table."""
    done = attempts_done(folder)
    if done == 0:
        return 1
    pending = pending_urls(folder, urls())
    if not pending:
        return done
    index = read_index(folder)
    never_tried = index is None or bool(set(pending) - set(index["key"].to_pylist()))
    if done == 0 or never_tried or done < 1 + options.rerun_attempts:
        return done + 1
    return done


def pending_urls(folder: Path, urls: dict[str, str]) -> dict[str, str]:
    """key -> URL of the records without a successful download of that same URL."""
    index = read_index(folder)
    ok = set()
    if index is not None:
        for key, url, status in zip(*(index[c].to_pylist() for c in ("key", "url", "status"))):
            if status == "success":
                ok.add((key, url))
    return {k: u for k, u in urls.items() if (k, u) not in ok}


def run_attempt(folder: Path, urls: dict[str, str], options: DownloadOptions, task_map: Any = None) -> pa.Table:
    """Download ``urls`` (key -> URL) as attempt N+1, a task per ``samples_per_shard`` URLs on ``task_map`` (the
    build's executor: Ray tasks over the cluster; default in this process), and rewrite the index; returns it."""
    n = attempts_done(folder) + 1
    out = folder / f"attempt-{n}"
    if out.exists():
        remove_tree(out)  # an attempt that crashed before it was marked done starts over
    out.mkdir(parents=True)
    keys, size = list(urls), options.samples_per_shard
    items = [(str(out / f"task-{i // size:05d}"), {k: urls[k] for k in keys[i : i + size]}, options)
             for i in range(0, len(keys), size)]  # fmt: skip
    tasks = (task_map or serial_map)(fetch_task, items, float(options.processes))
    atomic_write_bytes(out / "tasks.json", json.dumps(tasks, indent=1).encode())
    atomic_write_bytes(out / "done", b"")
    return rebuild_index(folder)


def fetch_task(folder: str, urls: dict[str, str], options: DownloadOptions) -> dict[str, Any]:
    """One img2dataset run over ``urls`` into ``folder`` (a task: it runs on whichever node the executor picks,
    writing to the work dir); returns how many URLs and where it ran."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no phoning home
    from img2dataset import download

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "urls.parquet"
    pq.write_table(pa.table({"url": list(urls.values()), KEY_COLUMN: list(urls)}), listing)
    logging.getLogger("img2dataset").setLevel(logging.WARNING)
    with _quiet_progress():
        _img2dataset(download, listing, out, options)
    return {"folder": out.name, "urls": len(urls), **worker_identity()}


@contextmanager
def _quiet_progress():
    """img2dataset's tqdm bar (on stderr, one per attempt) would interleave with the build's own progress: its
    distributor's ``tqdm`` is swapped for a disabled one while it runs (tqdm reads TQDM_DISABLE only when it is
    first imported, which another package has done by then)."""
    from functools import partial

    from img2dataset import distributor

    original = distributor.tqdm
    distributor.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        distributor.tqdm = original


def _img2dataset(download, listing: Path, out: Path, options: DownloadOptions) -> None:
    download(
        url_list=str(listing),
        input_format="parquet",
        url_col="url",
        output_format="webdataset",
        output_folder=str(out / "shards"),
        save_additional_columns=[KEY_COLUMN],
        image_size=options.image_size,
        resize_mode=options.resize_mode,
        encode_format=options.encode_format,
        encode_quality=options.encode_quality,
        timeout=options.timeout,
        retries=options.retries,
        processes_count=options.processes,
        thread_count=options.threads,
        number_sample_per_shard=options.samples_per_shard,
        distributor="multiprocessing",
        enable_wandb=False,
        incremental_mode="incremental",  # the attempt folder is new: nothing to skip
    )


def _attempt_rows(attempt_dir: Path, attempt: int) -> list[dict]:
    rows = []
    tables = sorted(attempt_dir.glob("task-*/shards/*.parquet")) + sorted((attempt_dir / "shards").glob("*.parquet"))
    for table_path in tables:  # (an attempt of an earlier version has one shards folder and no tasks)
        table = pq.read_table(table_path)
        offsets: dict[str, tuple[int, int]] = {}
        tar_path = table_path.with_suffix(".tar")
        if tar_path.is_file():
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    stem, _, ext = member.name.partition(".")
                    if ext in ("jpg", "png", "webp"):
                        offsets[stem] = (member.offset_data, member.size)
        for r in table.select(["key", KEY_COLUMN, "url", "status", "error_message"]).to_pylist():
            place = offsets.get(r["key"]) if r["status"] == "success" else None
            rows.append({"key": r[KEY_COLUMN], "url": r["url"], "status": r["status"],
                         "error": r["error_message"], "attempt": attempt,
                         "tar": str(tar_path) if place else None, "offset": place[0] if place else None,
                         "size": place[1] if place else None})  # fmt: skip
    return rows


def rebuild_index(folder: Path) -> pa.Table:
    """Latest outcome per key over all finished attempts -> ``index.parquet`` (atomically replaced)."""
    latest: dict[str, dict] = {}
    for n in range(1, attempts_done(folder) + 1):
        for row in _attempt_rows(folder / f"attempt-{n}", n):
            latest[row["key"]] = row
    rows = [latest[k] for k in sorted(latest)]
    table = pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "url": pa.array([r["url"] for r in rows], pa.string()),
        "status": pa.array([r["status"] for r in rows], pa.string()),
        "error": pa.array([r["error"] for r in rows], pa.string()),
        "attempt": pa.array([r["attempt"] for r in rows], pa.int32()),
        "tar": pa.array([r["tar"] for r in rows], pa.string()),
        "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        "size": pa.array([r["size"] for r in rows], pa.int64()),
    })  # fmt: skip
    with atomic_path(folder / "index.parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def read_bytes(tar: str, offset: int, size: int) -> bytes:
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def attach(table: pa.Table, folder: Path) -> pa.Table:
    """Adds ``_fetched``: the downloaded bytes of URL images; failed downloads get img2dataset's status as
    their reject reason (``download failed_to_download``, ``download failed_to_resize``) and its message."""
    keys, images = table["key"].to_pylist(), table["image"].to_pylist()
    url_keys = [k for k, image in zip(keys, images) if is_url(image)]
    index = read_index(folder, url_keys) if url_keys else None
    found = {r["key"]: r for r in index.to_pylist()} if index is not None else {}
    fetched: list[bytes | None] = []
    reasons, errors = table["_reason"].to_pylist(), table["_error"].to_pylist()
    for i, (key, image) in enumerate(zip(keys, images)):
        row = found.get(key) if is_url(image) else None
        if not is_url(image) or (row is not None and row["status"] == "success" and row["url"] == image):
            fetched.append(read_bytes(row["tar"], row["offset"], row["size"]) if row else None)
            continue
        fetched.append(None)
        if row is None or row["url"] != image:
            reasons[i], errors[i] = "not downloaded", f"{image}: no img2dataset result for this URL"
        else:
            reasons[i] = f"download {row['status']}"
            errors[i] = f"{image}: {row['error'] or row['status']} (attempt {row['attempt']})"
    table = table.set_column(table.schema.get_field_index("_reason"), "_reason", pa.array(reasons, pa.string()))
    table = table.set_column(table.schema.get_field_index("_error"), "_error", pa.array(errors, pa.string()))
    return table.append_column("_fetched", pa.array(fetched, pa.binary()))
