"""Training pairs streamed from webdataset shards (`ShardPairs`), or read from the manifest.

`ShardPairs` streams the pairs of some splits with the `webdataset` library, as OpenCLIP
reads its training data: shards resampled with replacement by each node and DataLoader
worker from its own seeded stream (or, not resampled, split by node then by worker), a
shuffle buffer, one random caption per image, and an explicit number of samples per epoch.
Images are read as `PairsDataset` reads them (`vlp.data.torch_data.ImageReader`): without
augmentation each process keeps up to `CACHE_BYTES` of fitted images, so an image is not
decoded again for each of its captions and epochs. Nothing else but the shuffle buffer is
held in memory. The shard format is `vlp.data.shards`'.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from vlp.data.images import Augmentation, ImageTransform, swap_left_right
from vlp.data.shards import check_shard_counts, open_image, parse_record, read_index
from vlp.data.torch_data import ImageReader, PairsDataset
from vlp.errors import DataError

_BLOCK = 512


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for values past the octal field's range
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError:
        raise ValueError(f"bad {what} field {field!r}") from None


def _pax(data: bytes) -> dict[str, str]:
    """The records (`"%d key=value\n"`) of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of an uncompressed tar, in order.

    A plain reader of the ustar headers (pax and GNU long names followed): the shards are
    read sample by sample in training, and `tarfile`'s member objects cost more per sample
    than a small image's decode. DataError naming the shard if it is truncated or a header
    is damaged.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            header = f.read(_BLOCK)
            if not header or header == bytes(_BLOCK):
                return
            try:
                if len(header) < _BLOCK:
                    raise ValueError("truncated header")
                stored = _octal(header[148:156], "checksum")
                if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                    raise ValueError("header checksum mismatch")
                size = int(pax["size"]) if "size" in pax else _octal(header[124:136], "size")
            except ValueError as e:
                raise DataError(f"{path}: unreadable shard: {e}") from None
            data = f.read(size)
            if len(data) < size:
                raise DataError(f"{path}: unreadable shard: truncated member")
            f.seek(-size % _BLOCK, os.SEEK_CUR)
            kind = header[156:157]
            if kind in (b"x", b"g"):
                pax = _pax(data) if kind == b"x" else pax
                continue
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = pax.get("path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and prefix:
                    name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
            long_name, pax = None, {}
            if kind in (b"0", b"\0"):
                yield name, data


def _tar_samples(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset samples (`__key__`, `__url__`, one entry per extension) of shard urls.

    Members are grouped as webdataset groups them: consecutive names sharing the part of
    the file name before its first dot.
    """
    for source in sources:
        url = source["url"]
        sample: dict[str, Any] = {}
        for name, data in tar_members(url):
            folder, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample:
            yield sample


class ShardPairs(IterableDataset):
    """(image, caption) pairs of some splits streamed from a shard directory.

    Items are those of `PairsDataset` (pixel_values, caption, image_id, caption_id): one per
    sample, its caption drawn at random from the image's captions (the first with
    `first_caption_only`). An epoch is `len(self)` items over all nodes: the captions of the
    splits (the images with `first_caption_only`), so an epoch is as long as one over
    `PairsDataset`. Every draw (shards, shuffle, caption, augmentation) is seeded by
    (`seed`, epoch, rank, worker): a run is repeatable for the same number of processes and
    workers. The training loop calls `set_epoch` before each epoch.

    With `resampled` (training), each node and worker draws shards with replacement from
    its own stream and the epoch ends after its share of `len(self)` samples. Without, the
    shard list is split by node, then by worker, and read once: every sample once overall.
    With `fast_jpeg`, JPEGs are decoded at reduced scale (`vlp.data.decode`).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        splits: Iterable[str],
        transform: ImageTransform,
        augment: Augmentation | None = None,
        *,
        seed: int,
        shuffle_buffer: int,
        resampled: bool = True,
        first_caption_only: bool = False,
        fast_jpeg: bool = False,
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.splits = sorted(set(splits))
        index = read_index(self.shard_dir)
        used = [
            s
            for s in index["shards"]
            if any(s["splits"].get(name, {}).get("images") for name in self.splits)
        ]
        for shard in used:  # the epoch length comes from the index: it must be the tars'
            check_shard_counts(self.shard_dir / shard["name"], shard)
        self.urls = [str(self.shard_dir / s["name"]) for s in used]
        per_split = index["total"]["splits"]
        what = "images" if first_caption_only else "captions"
        self.n_samples = sum(per_split.get(name, {}).get(what, 0) for name in self.splits)
        if not self.urls or self.n_samples == 0:
            has = ", ".join(f"{k}: {v['images']} images" for k, v in per_split.items()) or "none"
            raise DataError(
                f"{self.shard_dir}: no samples in split(s) {', '.join(self.splits)}; "
                f"its shards hold {has}"
            )
        if shuffle_buffer < 0:
            raise DataError(f"data.shuffle_buffer: must be >= 0, got {shuffle_buffer}")
        self.transform = transform
        self.augment = augment
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.first_caption_only = first_caption_only
        self.fast_jpeg = fast_jpeg
        self._reader: ImageReader | None = None  # made in the process that reads
        # Shared with DataLoader workers, which persist across epochs.
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._micro_batch = multiprocessing.Value("q", 1, lock=False)

    def __len__(self) -> int:
        return self.n_samples

    def __getstate__(self) -> dict[str, Any]:
        # a worker started by spawn begins with an empty image cache, not a copy of ours
        return {**self.__dict__, "_reader": None}

    def set_epoch(self, epoch: int, micro_batch_size: int = 1) -> None:
        """Start `epoch`; each worker then yields whole micro-batches enough for its share."""
        self._epoch.value = int(epoch)
        self._micro_batch.value = int(micro_batch_size)

    def _per_worker(self, world: int, workers: int) -> int:
        micro = max(int(self._micro_batch.value), 1)
        batches = self.n_samples // world // micro
        return max(math.ceil(batches / workers), 1) * micro

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        epoch = int(self._epoch.value)
        stream_seed = [self.seed, epoch, rank, worker]
        if self.resampled:
            seed = int(np.random.default_rng([*stream_seed, 0]).integers(2**31))
            source: list[Any] = [wds.ResampledShards(self.urls, seed=seed, deterministic=True)]
        else:
            source = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
        stages: list[Any] = [*source, _tar_samples]
        if self.shuffle_buffer > 1:
            seed = int(np.random.default_rng([*stream_seed, 1]).integers(2**31))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed))
        rng = np.random.default_rng([*stream_seed, 2])
        stream_id, n_streams = rank * workers + worker, world * workers
        stages.append(lambda src: self._pairs(src, rng, epoch, stream_id, n_streams))
        pipeline = wds.DataPipeline(*stages)
        if self.resampled:
            pipeline = pipeline.with_epoch(self._per_worker(world, workers))
        return iter(pipeline)

    def _pairs(
        self,
        samples: Iterator[dict[str, Any]],
        rng: np.random.Generator,
        epoch: int,
        stream_id: int,
        n_streams: int,
    ) -> Iterator[dict[str, Any]]:
        if self._reader is None:
            self._reader = ImageReader(self.transform, self.augment, self.fast_jpeg)
        reader = self._reader
        for position, sample in enumerate(samples):
            url, key = sample.get("__url__", self.shard_dir), sample.get("__key__")
            record = parse_record(sample, key, url)
            if record["split"] not in self.splits:
                continue
            images = [ext for ext in sample if not ext.startswith("__") and ext != "json"]
            if len(images) != 1:
                raise DataError(f"{url}: sample {key}: expected one image, found {images}")
            captions = record["captions"]
            pick = 0 if self.first_caption_only else int(rng.integers(len(captions)))
            caption = captions[pick]
            index = position * n_streams + stream_id  # distinct per sample of the epoch
            opener = partial(open_image, sample[images[0]], url, key)
            pixels, flipped = reader(int(record["image_id"]), opener, index, epoch)
            text = str(caption["caption"])
            yield {
                "pixel_values": pixels,
                "caption": swap_left_right(text) if flipped else text,
                "image_id": int(record["image_id"]),
                "caption_id": int(caption["caption_id"]),
            }


def pairs_for_training(
    data_root: str | os.PathLike,
    shard_dir: str | None,
    splits: list[str],
    transform: ImageTransform,
    augment: Augmentation | None,
    *,
    seed: int,
    shuffle_buffer: int,
    first_caption_only: bool = False,
    fast_jpeg: bool = False,
) -> torch.utils.data.Dataset:
    """The training pairs of `splits`: streamed from `shard_dir` when set, else `PairsDataset`.

    Says once per process which shards it streams.
    """
    if shard_dir is None:
        return PairsDataset(
            data_root, splits, transform, augment, first_caption_only, fast_jpeg=fast_jpeg
        )
    pairs = ShardPairs(
        shard_dir,
        splits,
        transform,
        augment,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        first_caption_only=first_caption_only,
        fast_jpeg=fast_jpeg,
    )
    _say_streaming(str(pairs.shard_dir), len(pairs.urls), ", ".join(pairs.splits))
    return pairs


@cache
def _say_streaming(shard_dir: str, n_shards: int, splits: str) -> None:
    print(f"data: streaming pairs of {splits} from {n_shards} shards in {shard_dir} (data.shards)")
