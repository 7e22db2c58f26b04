"""Writers of precomputed-embedding folders in the published layouts, with planted unsafe -> safe pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def planted_pool(rows: int, dim: int, seed: int = 0) -> dict:
    """Half safe records, half unsafe edits of a safe one (text and image moved a little: the planted answer)."""
    rng = np.random.default_rng(seed)
    pairs = rows // 2
    safe_text = rng.standard_normal((pairs, dim)).astype(np.float32)
    safe_image = rng.standard_normal((pairs, dim)).astype(np.float32)
    unsafe_text = safe_text + 0.35 * rng.standard_normal((pairs, dim)).astype(np.float32)
    unsafe_image = safe_image + 0.35 * rng.standard_normal((pairs, dim)).astype(np.float32)
    order = rng.permutation(rows)  # safe and unsafe records interleaved over the parts
    text = np.concatenate([safe_text, unsafe_text])[order]
    image = np.concatenate([safe_image, unsafe_image])[order]
    keys = np.array([f"safe{i:06d}" for i in range(pairs)] + [f"unsafe{i:06d}" for i in range(pairs)])[order]
    return {"keys": keys.tolist(), "text": text, "image": image * 3.0,  # files need not be normalised
            "punsafe": [0.95 if k.startswith("unsafe") else 0.05 for k in keys]}  # fmt: skip


def _caption(key: str) -> str:
    """Every seventh record has a one-word caption (a filter with caption_words min 2 drops it)."""
    return key if int(key[-6:]) % 7 == 3 else f"a photo of {key}"


def write_clip_retrieval(folder: Path, pool: dict, parts: int, url: str = "http://127.0.0.1:9/img/{key}.jpg") -> Path:
    """LAION / clip-retrieval: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(np.array_split(np.arange(len(pool["keys"])), parts)):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", pool["image"][rows].astype(np.float16))
        np.save(folder / "text_emb" / f"text_emb_{n}.npy", pool["text"][rows].astype(np.float16))
        keys = [pool["keys"][i] for i in rows]
        table = pa.table({"key": keys, "caption": [_caption(k) for k in keys],
                          "url": [url.format(key=k) for k in keys], "punsafe": [pool["punsafe"][i] for i in rows],
                          "similarity": [0.3] * len(rows)})  # fmt: skip
        pq.write_table(table, folder / "metadata" / f"metadata_{n}.parquet", row_group_size=97)
    return folder


def write_datacomp(folder: Path, pool: dict, parts: int, url: str = "http://127.0.0.1:9/img/{key}.jpg") -> Path:
    """DataComp: <shard>.parquet (uid, url, text) + <shard>.npz (b32_img, b32_txt, l14_img, l14_txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(np.array_split(np.arange(len(pool["keys"])), parts)):
        keys = [pool["keys"][i] for i in rows]
        captions, punsafe = [_caption(k) for k in keys], [pool["punsafe"][i] for i in rows]
        meta = pa.table({"uid": keys, "url": [url.format(key=k) for k in keys], "text": captions, "punsafe": punsafe})
        pq.write_table(meta, folder / f"{n:08d}.parquet")
        other = np.zeros((len(rows), 8), np.float16)  # another model's arrays, not asked for
        np.savez(folder / f"{n:08d}.npz", b32_img=pool["image"][rows].astype(np.float16),
                 b32_txt=pool["text"][rows].astype(np.float16), l14_img=other, l14_txt=other)  # fmt: skip
    return folder
