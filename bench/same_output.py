"""Two builds of one recipe compared file by file: which data files are byte-identical, and where they are not,
whether they hold the same records (by key), the same targets and the same values (floats within a tolerance).

For checking that a new release, executor or scaling path writes what the old one wrote. Bookkeeping (markers,
manifests, task logs, the report, which say when and where things ran) is left out; tar samples are compared by
key whichever tar holds them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SKIPPED_DIRS = {"report", "_tasks", "_runs", "_partitions", "_pool", "_input", "export"}


def data_files(root: Path) -> dict[str, Path]:
    """Relative path -> file for every parquet table and tar of a work dir (bookkeeping left out)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix in (".parquet", ".tar") and not SKIPPED_DIRS & set(rel.parts):
            out[str(rel)] = path
    return out


def _sort_key_columns(table: pa.Table) -> list[str]:
    return [n for n in ("key", "modality", "rank", "benchmark_id", "shard") if n in table.column_names]


def _float_values(column: pa.ChunkedArray) -> np.ndarray | None:
    """A float (or list-of-float) column as one float64 array (nulls as NaN), else None."""
    kind = column.type
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        column, kind = pa.chunked_array([c.flatten() for c in column.chunks], kind.value_type), kind.value_type
    if not pa.types.is_floating(kind):
        return None
    return np.asarray(column.to_numpy(zero_copy_only=False), np.float64)


def compare_tables(a: pa.Table, b: pa.Table) -> tuple[bool, float, str]:
    """(same records and values, largest float difference, what differs first)."""
    if sorted(a.column_names) != sorted(b.column_names) or a.num_rows != b.num_rows:
        return False, float("inf"), f"columns or rows differ: {a.column_names} x {a.num_rows} vs {b.num_rows}"
    keys = _sort_key_columns(a)
    if keys:
        a, b = (t.sort_by([(k, "ascending") for k in keys]) for t in (a, b))
    worst = 0.0
    for name in a.column_names:
        fa, fb = _float_values(a[name]), _float_values(b[name])
        if fa is not None and fb is not None and len(fa) == len(fb):
            both = ~(np.isnan(fa) & np.isnan(fb))
            if both.any():
                worst = max(worst, float(np.nanmax(np.abs(fa[both] - fb[both]))) if len(fa[both]) else 0.0)
            if np.isnan(fa).sum() != np.isnan(fb).sum():
                return False, worst, f"column {name}: nulls differ"
        elif not a[name].equals(b[name]):
            return False, worst, f"column {name} differs"
    return True, worst, ""


def tar_samples(folder: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    import webdataset as wds

    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def _member_difference(x: bytes, y: bytes, name: str) -> float | None:
    """0 when equal; for .npy members the largest element difference; None when they differ otherwise."""
    if x == y:
        return 0.0
    if name.endswith(".npy"):
        u, v = np.load(io.BytesIO(x)), np.load(io.BytesIO(y))
        return float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)))) if u.shape == v.shape else None
    return None


def compare_tar_folders(a: Path, b: Path) -> tuple[bool, float, str]:
    """The samples of two folders of tars, by key: the same members, equal (arrays within float tolerance)."""
    left, right = dict(tar_samples(a)), dict(tar_samples(b))
    if left.keys() != right.keys():
        return False, float("inf"), f"{len(left.keys() ^ right.keys())} sample keys differ"
    worst = 0.0
    for key, sample in left.items():
        if sample.keys() != right[key].keys():
            return False, worst, f"sample {key}: members differ"
        for name, value in sample.items():
            diff = _member_difference(value, right[key][name], name)
            if diff is None:
                return False, worst, f"sample {key}: {name} differs"
            worst = max(worst, diff)
    return True, worst, f"{len(left):,} samples"


def compare_builds(a: Path, b: Path, tolerance: float = 1e-6) -> list[dict]:
    """One row per stage folder: files, byte-identical files, and for the rest whether the records match."""
    files_a, files_b = data_files(a), data_files(b)
    rows: dict[str, dict] = {}
    for rel in sorted(files_a.keys() | files_b.keys()):
        stage = rel.split("/", 1)[0]
        row = rows.setdefault(stage, {"stage": stage, "files": 0, "identical": 0, "same_records": 0,
                                      "max_float_diff": 0.0, "differ": []})  # fmt: skip
        row["files"] += 1
        if rel.endswith(".tar"):
            continue  # compared per folder, by sample key, below
        if rel not in files_a or rel not in files_b:
            row["differ"].append(f"{rel}: only in {'the first' if rel in files_a else 'the second'}")
        elif files_a[rel].read_bytes() == files_b[rel].read_bytes():
            row["identical"] += 1
        else:
            same, worst, why = compare_tables(pq.read_table(files_a[rel]), pq.read_table(files_b[rel]))
            row["max_float_diff"] = max(row["max_float_diff"], worst)
            if same and worst <= tolerance:
                row["same_records"] += 1
            else:
                row["differ"].append(f"{rel}: {why or f'float difference {worst:.2e}'}")
    for folder in sorted({str(Path(r).parent) for r in files_a if r.endswith(".tar")}):
        row = rows[folder.split("/", 1)[0]]
        tars = [p for p in (a / folder).glob("*.tar")]
        if all((b / folder / p.name).is_file() and p.read_bytes() == (b / folder / p.name).read_bytes() for p in tars):
            row["identical"] += len(tars)
            continue
        same, worst, why = compare_tar_folders(a / folder, b / folder)
        row["max_float_diff"] = max(row["max_float_diff"], worst)
        if same and worst <= tolerance:
            row["same_records"] += len(tars)
            row.setdefault("notes", []).append(f"{folder}: {why}, tars numbered differently")
        else:
            row["differ"].append(f"{folder}: {why}")
    return list(rows.values())


def print_comparison(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("stage", "files", "byte-identical", "same records", "largest float difference", "differ"):
        table.add_column(column, justify="left" if column in ("stage", "differ") else "right")
    for r in rows:
        table.add_row(r["stage"], str(r["files"]), str(r["identical"]), str(r["same_records"]),
                      f"{r['max_float_diff']:.2e}", "; ".join(r["differ"][:3]) or "-")  # fmt: skip
    Console(width=max(Console().width, 120)).print(table)
