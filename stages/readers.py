"""Readers for the source layouts: tabular manifests, image folders with sidecar captions, WebDataset tars.

Each reader returns an Arrow table of *raw* records with the columns of :data:`RAW_COLUMNS`; problems found
while reading (a truncated tar member, say) are carried in ``_reason``/``_error`` so the source stage can
turn them into rejects instead of losing them.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from saferclip_data.pipeline import storage
from saferclip_data.pipeline.tars import NotPlainTar, TarDamage, scan_tar

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # what a manifest path may be too
CAPTION_EXTENSIONS = ("txt", "caption")
RAW_COLUMNS = ("key", "caption", "image", "group", "label", "category", "_reason", "_error")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(value: Any) -> str:
    """A stable key that WebDataset can use: no dots (the first dot starts the extension), no slashes."""
    key = _UNSAFE_KEY_CHARS.sub("_", str(value)).strip("_")
    return key or "_"


def manifest_format(path: str | Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = PurePosixPath(storage.name(str(path))).suffix.lower().lstrip(".")
    return {
        "parquet": "parquet",
        "pq": "parquet",
        "jsonl": "jsonl",
        "json": "jsonl",
        "ndjson": "jsonl",
        "csv": "csv",
        "tsv": "csv",
    }.get(suffix, "")


def read_manifest(path: str | Path, fmt: str) -> pa.Table:
    """The whole manifest as Arrow (no image bytes are loaded here, only what the file holds); a URL is
    streamed through the storage layer."""
    if storage.is_url(str(path)):
        with storage.open_file(str(path)) as file:
            return _read_manifest(file, fmt, storage.name(str(path)))
    return _read_manifest(path, fmt, Path(path).name)


def _read_manifest(source: Any, fmt: str, filename: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(source)
    if fmt == "jsonl":
        return pajson.read_json(source)
    if fmt == "csv":
        delimiter = "\t" if filename.lower().endswith(".tsv") else ","
        parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
        # strings stay strings: a key or a caption like "0012" must not become an integer
        convert = pacsv.ConvertOptions(strings_can_be_null=False)
        table = pacsv.read_csv(source, parse_options=parse, convert_options=convert)
        # a column with bytes that are not UTF-8 comes back as binary: decode it value by value
        return _decoded_per_row(table) if any(pa.types.is_binary(f.type) for f in table.schema) else table
    raise ValueError(f"unknown manifest format for {filename}")


UNDECODABLE = "_undecodable"  # manifest column: why a row's text could not be read (its record is rejected)


def _decoded_per_row(table: pa.Table) -> pa.Table:
    """A CSV's binary columns decoded value by value: a value that is not UTF-8 leaves its row's text null and says
    which column and row in ``_undecodable``, so that that record is rejected and every other one kept."""
    columns, problems = {}, [None] * table.num_rows
    for name in table.column_names:
        if not pa.types.is_binary(table.schema.field(name).type):
            columns[name] = table[name]
            continue
        values = []
        for row, raw in enumerate(table[name].to_pylist()):
            try:
                values.append(raw.decode("utf-8") if raw is not None else None)
            except UnicodeDecodeError as exc:
                values.append(None)
                problems[row] = problems[row] or f"column {name}, data row {row + 1}: not UTF-8 ({exc.reason})"
        columns[name] = pa.array(values, pa.string())
    return pa.table({**columns, UNDECODABLE: pa.array(problems, pa.string())})


def list_image_folder(root: str | Path) -> list[str]:
    """Image files below ``root`` (a folder or a URL prefix), relative and sorted, so that shard contents are
    deterministic."""
    files = storage.walk_files(str(root))
    return [f for f in files if PurePosixPath(f).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]


def _sidecars(root: str, files: list[str]) -> set[str]:
    """Which caption files exist beside these images (relative names): one listing per folder of a URL
    prefix instead of a request per image."""
    wanted = {str(PurePosixPath(rel).with_suffix(f".{ext}")) for rel in files for ext in CAPTION_EXTENSIONS}
    if not storage.is_url(root):
        return {rel for rel in wanted if (Path(root) / rel).is_file()}
    folders = {str(PurePosixPath(rel).parent) for rel in files}
    present = set()
    for folder in folders:
        base = storage.join(root, folder) if folder != "." else root
        names = {storage.name(f) for f in storage.list_files(base)}
        here = PurePosixPath(folder)
        present |= {rel for rel in wanted if PurePosixPath(rel).parent == here and PurePosixPath(rel).name in names}
    return present


def read_image_folder(root: str | Path, files: list[str]) -> pa.Table:
    root = str(root)
    captions = _sidecars(root, files)
    rows: dict[str, list] = {c: [] for c in RAW_COLUMNS}
    for rel in files:
        caption = None
        for ext in CAPTION_EXTENSIONS:
            sidecar = str(PurePosixPath(rel).with_suffix(f".{ext}"))
            if sidecar in captions:
                text = storage.read_bytes(storage.join(root, sidecar))
                caption = text.decode("utf-8", errors="replace").strip()
                break
        folder = PurePosixPath(rel).parent
        label = folder.as_posix() if str(folder) != "." else None
        key = sanitize_key(PurePosixPath(rel).with_suffix("").as_posix())
        values = {
            "key": key,
            "caption": caption,
            "image": storage.join(root, rel),
            "group": key,
            "label": label,
            "category": None,
            "_reason": None,
            "_error": None,
        }
        for c in RAW_COLUMNS:
            rows[c].append(values[c])
    return pa.table({c: pa.array(v, type=pa.string()) for c, v in rows.items()})


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: directory + basename up to the first dot is the key; the rest the extension."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_webdataset_tar(path: str | Path, extra_columns: list[str]) -> tuple[pa.Table, dict[str, list]]:
    """Samples of one tar, grouped by key from *contiguous* members (the WebDataset layout).

    A tar that breaks (truncated, or a damaged header) keeps every sample before the break; the sample whose
    member is cut, or a record named after the last good key, carries ``_reason``, because nothing after a
    break can be trusted. Plain ustar/pax tars are read through the header index of ``pipeline.tars`` (about
    three times tarfile's speed), others (compressed, GNU long names) through tarfile. A URL is copied to the
    node's scratch dir first (one sequential read) and read the same way.
    """
    if storage.is_url(str(path)):
        with storage.local_copy(str(path)) as local:
            return read_webdataset_tar(local, extra_columns)
    path = Path(path)
    try:
        members, damage = _indexed_members(path)
    except NotPlainTar:
        members, damage = _tarfile_members(path)
    return _raw_table(_samples(members, damage, path), extra_columns)


def _indexed_members(path: Path) -> tuple[list[tuple[str, bytes]], TarDamage | None]:
    """(name, bytes) of a plain tar's files, read from a memory map at the offsets of its header index, and
    where it breaks."""
    import mmap

    index, damage = scan_tar(path)
    if not index:  # (an empty file cannot be mapped)
        return [], damage
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return [(name, mapped[start : start + size]) for name, start, size in index], damage


def _tarfile_members(path: Path) -> tuple[list[tuple[str, bytes]], TarDamage | None]:
    """The same through tarfile, for the tars the index leaves to it (compressed, GNU long names, links)."""
    members: list[tuple[str, bytes]] = []
    end = 0  # where the last member read ends
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                try:
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                except (tarfile.TarError, OSError, EOFError) as exc:
                    return members, TarDamage(member.offset, member.name, "truncated", str(exc))
                members.append((member.name, data))
                end = member.offset_data + member.size
    except (tarfile.TarError, OSError, EOFError) as exc:  # the archive itself broke between members
        return members, TarDamage(end, None, "truncated", str(exc))
    return members, None


def _samples(members: list[tuple[str, bytes]], damage: TarDamage | None, path: Path) -> list[dict[str, Any]]:
    """Members grouped into samples by key (``{"__key__": key, ext: bytes, ...}``, contiguous members), with
    the break, if any, on the sample whose member it cut or on a record named after the last good key."""
    samples: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    for name, data in members:
        key, ext = _split_member_name(name)
        if current is None or current["__key__"] != key:
            if current is not None:
                samples.append(current)
            current = {"__key__": key}
            if key in seen:  # a sample's members must be contiguous: a second run of the key is another record
                current.update(_reason="repeated sample key", _error=f"{name}: key {key} already read in {path.name}")
            seen.add(key)
        if ext in current and "_reason" not in current:  # which of the two is the sample's? neither is kept
            current.update(_reason="repeated tar member", _error=f"{name} appears twice in sample {key}")
        current[ext] = data
    if damage is not None:
        reason = f"{damage.kind} tar member"
        cut_key = _split_member_name(damage.member)[0] if damage.member is not None else None
        if cut_key is not None and current is not None and current["__key__"] == cut_key:
            current.update(_reason=reason, _error=f"{damage.member}: {damage.message}")
        else:
            if current is not None:
                samples.append(current)
            error = f"{damage.member or path.name}: {damage.message}"
            after = current["__key__"] if current else "start"
            current = {
                "__key__": cut_key or f"{path.stem}_unreadable_after_{after}",
                "_reason": reason,
                "_error": error,
            }
    if current is not None:
        samples.append(current)
    return samples


def _raw_table(samples: list[dict[str, Any]], extra_columns: list[str]) -> tuple[pa.Table, dict[str, list]]:
    """The raw records of a tar's samples: image and caption by extension, group/label/category and any
    ``extra_columns`` from the sample's json."""
    rows: dict[str, list] = {c: [] for c in RAW_COLUMNS}
    extras: dict[str, list] = {c: [] for c in extra_columns}
    for sample in samples:
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        caption_bytes = next((sample[e] for e in CAPTION_EXTENSIONS if e in sample), None)
        caption = caption_bytes.decode("utf-8", errors="replace").strip() if caption_bytes is not None else None
        if caption is None and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        key = sanitize_key(meta.get("key") or sample["__key__"])
        values = {
            "key": key,
            "caption": caption,
            "image": image,
            "group": str(meta["group"]) if meta.get("group") is not None else key,
            "label": str(meta["label"]) if meta.get("label") is not None else None,
            "category": str(meta["category"]) if meta.get("category") is not None else None,
            "_reason": sample.get("_reason"),
            "_error": sample.get("_error"),
        }
        for c in RAW_COLUMNS:
            rows[c].append(values[c])
        for c in extra_columns:
            extras[c].append(None if meta.get(c) is None else str(meta.get(c)))
    columns = {c: pa.array(v, type=pa.binary() if c == "image" else pa.string()) for c, v in rows.items()}
    return pa.table(columns), extras
