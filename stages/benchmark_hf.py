"""The benchmark as a Hugging Face dataset folder, the layout NSFW-Caps itself is published in.

::

    OUT/README.md                       dataset card: YAML front matter (configs, features, license) + how it was built
    OUT/data/test-00000-of-00001.parquet one row per quadruplet: safe/unsafe image (an ``Image`` feature) and caption,
                                        category, keys, alignments and similarities

Images are stored as Hugging Face's ``Image`` feature (a struct of ``bytes`` and ``path``), and the Parquet schema
carries the ``huggingface`` features metadata, so ``datasets.load_dataset(OUT)`` returns PIL images and the right
types without a loading script. ``push`` uploads the folder with huggingface_hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from saferclip_data.pipeline.errors import UserError, missing_extra
from saferclip_data.pipeline.workdir import WorkDir, atomic_write_parquet, atomic_write_text
from saferclip_data.stages.samples import image_extension, source_rows

ROWS_PER_FILE = 1000
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
#: the table's columns and their Hugging Face features (what the card and the Parquet metadata declare)
FEATURES: dict[str, dict[str, Any]] = {
    "benchmark_id": {"dtype": "string", "_type": "Value"},
    "category": {"dtype": "string", "_type": "Value"},
    "safe_image": {"_type": "Image"},
    "safe_caption": {"dtype": "string", "_type": "Value"},
    "unsafe_image": {"_type": "Image"},
    "unsafe_caption": {"dtype": "string", "_type": "Value"},
    "safe_key": {"dtype": "string", "_type": "Value"},
    "unsafe_key": {"dtype": "string", "_type": "Value"},
    "group": {"dtype": "string", "_type": "Value"},
    "safe_alignment": {"dtype": "float32", "_type": "Value"},
    "unsafe_alignment": {"dtype": "float32", "_type": "Value"},
    "caption_similarity": {"dtype": "float32", "_type": "Value"},
    "image_similarity": {"dtype": "float32", "_type": "Value"},
}
ARROW_TYPES = {"string": pa.string(), "float32": pa.float32()}


def _schema() -> pa.Schema:
    fields = [pa.field(name, IMAGE if f["_type"] == "Image" else ARROW_TYPES[f["dtype"]])
              for name, f in FEATURES.items()]  # fmt: skip
    info = {"info": {"features": FEATURES}}
    return pa.schema(fields, metadata={"huggingface": json.dumps(info)})


def quadruplet_table(workdir: WorkDir) -> pa.Table:
    """The benchmark's quadruplets with both images' bytes (from the source shards), in benchmark order."""
    path = workdir.stage_dir("benchmark") / "benchmark.parquet"
    if not (workdir.manifest("benchmark") or {}).get("complete") or not path.is_file():
        raise UserError(f"{workdir.root}: no finished benchmark stage; add stages.benchmark to the recipe and build")
    rows = pq.read_table(path).to_pylist()
    sources = source_rows(workdir, {r["safe_key"] for r in rows} | {r["unsafe_key"] for r in rows})
    columns: dict[str, list] = {name: [] for name in FEATURES}
    for r in rows:
        for name in FEATURES:
            if name.endswith("_image"):
                role = name.removesuffix("_image")
                image = sources[r[f"{role}_key"]]["image"]
                name_in_set = f"{r['benchmark_id']}-{role}.{image_extension(image)}" if image else None
                columns[name].append({"bytes": image, "path": name_in_set} if image else None)
            else:
                columns[name].append(r.get(name))
    return pa.Table.from_pydict(columns, schema=_schema())


def write_hf_dataset(workdir: WorkDir, out: Path, license_id: str = "other") -> dict[str, Any]:
    """Write the Hugging Face dataset folder; returns what was written (rows, files)."""
    table = quadruplet_table(workdir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for stale in data.glob("test-*.parquet"):
        stale.unlink()
    count = max(1, -(-table.num_rows // ROWS_PER_FILE))
    files = []
    for n in range(count):
        path = data / f"test-{n:05d}-of-{count:05d}.parquet"
        atomic_write_parquet(path, table.slice(n * ROWS_PER_FILE, ROWS_PER_FILE), row_group_size=100)
        files.append(path)
    sheet = json.loads((workdir.stage_dir("benchmark") / "datasheet.json").read_text())
    atomic_write_text(out / "README.md", dataset_card(sheet, table.num_rows, license_id))
    return {"rows": table.num_rows, "files": [str(p) for p in files]}


def dataset_card(sheet: dict, rows: int, license_id: str) -> str:
    """README.md of the dataset: YAML front matter the hub reads (configs, features, license), then the datasheet."""
    import yaml

    features = []
    for name, f in FEATURES.items():
        features.append({"name": name, "dtype": "image" if f["_type"] == "Image" else f["dtype"]})
    front = {
        "license": license_id,
        "task_categories": ["image-to-text", "text-to-image"],
        "tags": ["safety", "clip", "nsfw-caps", "retrieval"],
        "pretty_name": sheet.get("name", "benchmark"),
        "size_categories": ["n<1K" if rows < 1000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K"],
        "configs": [{"config_name": "default", "data_files": [{"split": "test", "path": "data/test-*.parquet"}]}],
        "dataset_info": {"features": features, "splits": [{"name": "test", "num_examples": rows}]},
    }
    files = "\n".join(f"| {p} | `{f['sha256']}` | {f['bytes']} |" for p, f in sheet.get("files", {}).items())
    search = json.dumps(sheet.get("target_search"))
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {sheet.get('name', 'benchmark')}\n\n"
        f"{rows} highly aligned safe/unsafe quadruplets (a safe image and caption, an unsafe image and caption of the "
        "same content), drawn by saferclip-data's benchmark stage from splits kept out of training.\n\n"
        "## How it was built\n\n"
        f"- recipe fingerprint: `{sheet.get('recipe_fingerprint')}`\n"
        f"- source: `{json.dumps(sheet.get('source'))}`\n- embedding model: `{sheet.get('model')}`\n"
        f"- thresholds: `{json.dumps(sheet.get('thresholds'))}`\n- selection settings: "
        f"`{json.dumps(sheet.get('settings'))}`\n- training targets searched: `{search}`\n"
        f"- leakage findings against the training pool: {sheet.get('leakage', {}).get('findings')}\n\n"
        "## Files of the build's own export (sha256)\n\n| file | sha256 | bytes |\n|---|---|---:|\n"
        f"{files}\n\n## Use\n\n```python\nfrom datasets import load_dataset\n\n"
        "ds = load_dataset(\"path/to/this/folder\", split=\"test\")\nds[0][\"unsafe_image\"]  # a PIL image\n```\n"
    )


def push(out: Path, repo: str, private: bool = True) -> str:
    """Upload the folder as a dataset repository (huggingface_hub, with the token of HF_TOKEN or a login)."""
    problem = missing_extra("huggingface_hub", "hf")
    if problem:
        raise UserError(f"export hf --push: {problem}")
    import huggingface_hub

    if not huggingface_hub.get_token():
        raise UserError("export hf --push: no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = huggingface_hub.HfApi()
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, folder_path=str(out), repo_type="dataset")
    return str(getattr(commit, "commit_url", repo))
