"""Streaming the quadruplet shards into training, with SaFeR-CLIP's easy-to-hard schedule.

The shards stage writes one sample per unsafe record (``unsafe.jpg``/``.txt``, the given pair ``safe.*``, the
frozen embeddings of its mined targets, and ``json`` with its difficulty bucket). This module streams them with
webdataset: shards and samples shuffled from (seed, epoch), so the order is reproducible and changes per
epoch; the curriculum admits only the buckets of the current epoch (default: easy; easy + medium; all);
samples are shared out over processes (DDP) and DataLoader workers. Records without an image (text-only
sources) come with ``has_image`` false and a zero image, so the trainer leaves them out of the image terms.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from saferclip_data.models.decode import to_rgb
from saferclip_data.pipeline.tars import NotPlainTar, scan_tar
from saferclip_data.training.config import DEFAULT_SCHEDULE


def buckets_for_epoch(epoch: int, schedule: Sequence[Sequence[str]] = DEFAULT_SCHEDULE) -> frozenset[str]:
    """Difficulty buckets admitted in ``epoch`` (0-based); the last entry holds for every later epoch."""
    if not schedule:
        raise ValueError("the progressive schedule needs at least one epoch's buckets")
    return frozenset(schedule[min(epoch, len(schedule) - 1)])


def _image(sample: dict, prefix: str) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if f"{prefix}.{ext}" in sample:
            return sample[f"{prefix}.{ext}"]
    return None


def decode_quad(sample: dict, preprocess: Callable | None, tokenizer: Callable, image_size: int) -> dict:
    """One tar sample -> tensors: unsafe and safe image/tokens, top-1 target embeddings, flags, metadata.
    With ``preprocess`` None the images stay encoded bytes (None where absent), for ``decode.DeviceDecoder``."""
    from PIL import Image

    meta = json.loads(sample["json"])

    def pixels(data: bytes | None) -> tuple[torch.Tensor | bytes | None, bool]:
        if preprocess is None:
            return data, data is not None
        if data is None:
            return torch.zeros(3, image_size, image_size), False
        return preprocess(to_rgb(Image.open(io.BytesIO(data)))), True

    unsafe_image, has_image = pixels(_image(sample, "unsafe"))
    safe_image, has_safe_image = pixels(_image(sample, "safe"))
    safe_text = sample.get("safe.txt", b"").decode("utf-8")
    targets_text = np.load(io.BytesIO(sample["targets_text.npy"]))
    targets_image = np.load(io.BytesIO(sample["targets_image.npy"]))
    return {
        "key": sample["__key__"],
        "unsafe_image": unsafe_image,
        "has_image": has_image,
        "unsafe_text": tokenizer([sample["unsafe.txt"].decode("utf-8")])[0],
        "safe_image": safe_image,
        "has_safe_image": has_safe_image,
        "safe_text": tokenizer([safe_text])[0],
        "has_safe_pair": meta.get("given_pair") is not None,
        "target_text": torch.from_numpy(targets_text[0].astype(np.float32)),
        "target_image": torch.from_numpy(targets_image[0].astype(np.float32)),
        "difficulty": meta["difficulty"],
        "category": meta["category"],
    }


def collate(samples: list[dict], text_trim: Callable | None = None) -> dict:
    """Stack samples into a batch. ``text_trim`` (``models.TextTrim``) cuts both caption batches to the columns
    they use, here on the CPU, so that the training step never has to look at token values."""
    out: dict = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[name] = torch.stack(values)
        elif isinstance(values[0], bool):
            out[name] = torch.tensor(values)
        else:
            out[name] = values
    if text_trim is not None:
        out["unsafe_text"], out["safe_text"] = text_trim(out["unsafe_text"], out["safe_text"])
    return out


def _plain_tar_index(url: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in the tar (``pipeline.tars.scan_tar``: Python's tarfile
    parses headers slowly enough to cap a DataLoader worker, which reads the whole stream, at ~3.7k samples/s here;
    with the index it is ~11k). A truncated or damaged tar is an error naming it, before any of its samples; raises
    NotPlainTar for a tar to leave to webdataset."""
    index, damage = scan_tar(url)
    if damage is not None:
        raise ValueError(f"{url}: {damage.message}")
    return index


@dataclass(frozen=True)
class TarMember:
    """A tar member's bytes, not yet read: the stream carries these for large members so that a DataLoader
    worker, which reads every sample's headers, copies only the samples it keeps (:func:`read_members`)."""

    url: str
    start: int
    size: int

    def read(self) -> bytes:
        return os.pread(_open_tar(self.url).fileno(), self.size, self.start)


@functools.lru_cache(maxsize=8)
def _open_tar(url: str):
    """The tars a worker reads members from, kept open (the shuffle buffer spans a few tars at a time)."""
    return open(url, "rb")  # noqa: SIM115 - closed with the process


def _tar_members(url: str, index: list[tuple[str, int, int]], defer_over: int | None) -> Iterator[dict]:
    """The indexed files as webdataset's tar expander yields them ({fname, data, __url__}), one at a time; the
    data of files over ``defer_over`` bytes as a :class:`TarMember`."""
    import mmap
    import re

    skip = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata entries, which it skips
    with open(url, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for name, start, size in index:
            if skip.match(name):
                continue
            deferred = defer_over is not None and size > defer_over
            data = TarMember(url, start, size) if deferred else mapped[start : start + size]
            yield {"fname": name, "data": data, "__url__": url}


def tar_samples(shards: Iterable[dict], defer_over: int | None = None) -> Iterator[dict]:
    """webdataset's ``tarfile_to_samples`` for local tars: the same samples in the same order (webdataset groups
    the members by key), with each tar's members read through :func:`_tar_members` (members over ``defer_over``
    bytes left unread, see :func:`read_members`); a tar it leaves to tarfile (links, GNU long names) is read by
    webdataset itself."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys

    for shard in shards:
        url = shard["url"]
        try:
            index = _plain_tar_index(url)
        except NotPlainTar:
            yield from wds.tarfile_to_samples()([shard])
            continue
        yield from group_by_keys(_tar_members(url, index, defer_over))


def read_members(sample: dict) -> dict:
    """The sample with every :class:`TarMember` read into bytes."""
    return {k: v.read() if isinstance(v, TarMember) else v for k, v in sample.items()}


def _difficulty(sample: dict) -> str:
    meta = sample["json"]
    return json.loads(meta.read() if isinstance(meta, TarMember) else meta)["difficulty"]


def _share(samples: Iterable[dict], rank: int, world_size: int, limit: int | None) -> Iterator[dict]:
    """This process's (and DataLoader worker's) share of the epoch's stream; see :func:`quad_pipeline`."""
    mine = itertools.islice(samples, rank, None, world_size)
    mine = itertools.islice(mine, limit) if limit is not None else mine
    info = torch.utils.data.get_worker_info()
    if info is not None:
        mine = itertools.islice(mine, info.id, None, info.num_workers)
    yield from mine


#: how the epoch's stream is shared among DDP ranks: every rank reads every tar and keeps every N-th sample
#: ("samples"), or each rank reads only its own tars ("tars": reading scales with the ranks)
SPLITS = ("samples", "tars")


def epoch_shard_order(urls: Sequence[str], seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                      split: str = "samples") -> list[str]:  # fmt: skip
    """The tars of ``epoch`` in the order they are read (shuffled from seed and epoch); with ``split`` "tars"
    only rank ``rank``'s: every ``world_size``-th of that order."""
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world_size] if split == "tars" else order


def quad_pipeline(
    urls: Sequence[str],
    preprocess: Callable | None,
    tokenizer: Callable,
    image_size: int,
    *,
    epoch: int,
    batch_size: int,
    seed: int = 0,
    schedule: Sequence[Sequence[str]] = DEFAULT_SCHEDULE,
    shuffle_buffer: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    text_trim: Callable | None = None,
    split: str = "samples",
):
    """A webdataset pipeline over the quadruplet tars for one epoch (iterate it, or wrap it in a DataLoader with
    ``batch_size=None``).

    Every process and DataLoader worker reads the same shuffled stream of (still encoded) samples and keeps its
    share: rank ``rank`` of ``world_size`` takes every ``world_size``-th sample, at most ``limit`` of them (so
    that all ranks run the same number of steps), and worker w of W takes every W-th of those before decoding.
    With ``split`` "tars" a rank's stream is its own tars only (:func:`epoch_shard_order`), of which it takes
    ``limit`` samples (the smallest rank's count, so that ranks stay in step; the rest wait for a later epoch).
    Every process reads every tar's headers and small members (captions, metadata); the images and embeddings
    are read, and decoded, only by the worker that keeps the sample. With ``preprocess`` None the
    images are left encoded, to be decoded on the training device (``decode.DeviceDecoder``).
    """
    import webdataset as wds

    admitted = buckets_for_epoch(epoch, schedule)
    order = epoch_shard_order(urls, seed, epoch, rank, world_size, split)
    if split == "tars":
        rank, world_size = 0, 1  # the rank's share is all of its own tars' stream
    return wds.DataPipeline(
        wds.SimpleShardList(order),
        partial(tar_samples, defer_over=1024),  # images and embeddings are read only by the worker keeping them
        wds.select(lambda s: _difficulty(s) in admitted),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed * 7919 + epoch)),
        partial(_share, rank=rank, world_size=world_size, limit=limit),
        wds.map(read_members),
        wds.map(lambda s: decode_quad(s, preprocess, tokenizer, image_size)),
        wds.batched(batch_size, collation_fn=partial(collate, text_trim=text_trim), partial=True),
    )
