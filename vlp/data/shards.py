"""Webdataset shards of a dataset directory: written by `vlp shard`, checked against their index.

A shard directory holds tar shards (`shard-000000.tar`, ...) and an index, `shards.json`.
Each sample is one image: its file's bytes as they are (`<key>.jpg`, `.png`, ...) and a
JSON record (`<key>.json`: image_id, split, image_path, captions with their caption ids,
and the image's VQA questions when the dataset has them). The index lists every shard
with its sample counts (images and captions per split), byte size and sha256, and the
totals. Tars are written with fixed owners and times, so the same dataset gives
byte-identical shards (DVC caching).

Training streams the shards with `vlp.data.shard_stream.ShardPairs`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from vlp.data.manifest import (
    SHARD_INDEX_FILE as INDEX_FILE,
)
from vlp.data.manifest import (
    check_split_names,
    has_vqa,
    image_roots,
    locate_image,
    no_rows_in_splits,
    read_pairs,
    read_vqa,
)
from vlp.errors import DataError, OutputError
from vlp.io import atomic_dir, atomic_write_json, index_outputs, load_json

INDEX_FORMAT = "vlp-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"
# PIL format -> the member extension webdataset's decoders and other readers expect.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
_HASH_CHUNK = 1 << 20


def _image_extension(path: Path) -> str:
    try:
        with Image.open(path) as img:
            fmt = img.format or ""
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from None
    return _EXTENSIONS.get(fmt, fmt.lower() or "img")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _records(data_dir: Path, splits: list[str] | None) -> Iterator[dict[str, Any]]:
    """One JSON record per image of `splits` (manifest order), with its image_path."""
    pairs = read_pairs(data_dir, splits)
    if pairs.empty:
        raise no_rows_in_splits(data_dir, splits, "caption pairs")
    questions: dict[int, list[dict[str, Any]]] = {}
    if has_vqa(data_dir):
        for row in read_vqa(data_dir, splits).to_dict("records"):
            questions.setdefault(int(row["image_id"]), []).append(
                {
                    "question_id": int(row["question_id"]),
                    "question": str(row["question"]),
                    "question_type": str(row["question_type"]),
                    "answers": list(row["answers"]),
                    "answer_type": str(row["answer_type"]),
                    "multiple_choice_answer": str(row["multiple_choice_answer"]),
                }
            )
    for image_id, group in pairs.groupby("image_id", sort=False):
        first = group.iloc[0]
        record: dict[str, Any] = {
            "image_id": int(image_id),
            "split": str(first["split"]),
            "image_path": str(first["image_path"]),
            "captions": [
                {"caption_id": int(cid), "caption": str(text)}
                for cid, text in zip(group["caption_id"], group["caption"], strict=True)
            ],
        }
        if questions:
            record["questions"] = questions.get(int(image_id), [])
        yield record


def write_shards(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    samples_per_shard: int = 1000,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """Write the images of `splits` (all when None) of a dataset directory as shards; return the index.

    `out` is replaced as a whole (`vlp.io.atomic_dir`): it must be missing, empty or a
    directory vlp wrote.
    """
    data_dir = Path(data_dir)
    _check_apart(data_dir, Path(out))
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    if splits:
        check_split_names(splits, "--split")
    roots = image_roots(data_dir)
    shards: list[dict[str, Any]] = []
    with atomic_dir(Path(out), "shards") as tmp:
        writer: wds.TarWriter | None = None
        entry: dict[str, Any] = {}

        def close() -> None:
            if writer is not None:
                writer.close()
                path = tmp / entry["name"]
                entry.update(bytes=path.stat().st_size, sha256=_sha256(path))
                shards.append(entry)

        for n, record in enumerate(_records(data_dir, splits)):
            if n % samples_per_shard == 0:
                close()
                entry = {"name": SHARD_PATTERN.format(len(shards)), "samples": 0, "splits": {}}
                # Fixed owner, mode and time: the same dataset gives the same bytes. An int
                # time: a float one costs a pax header per member, doubling tar reading.
                writer = wds.TarWriter(str(tmp / entry["name"]), mtime=0)
            path = locate_image(data_dir, record["image_path"], roots)
            ext = _image_extension(path)
            writer.write(
                {
                    "__key__": f"{record['image_id']}",
                    ext: path.read_bytes(),
                    "json": json.dumps(record, sort_keys=True).encode(),
                }
            )
            counts = entry["splits"].setdefault(record["split"], {"images": 0, "captions": 0})
            counts["images"] += 1
            counts["captions"] += len(record["captions"])
            entry["samples"] += 1
        close()
        index = {"format": INDEX_FORMAT, "shards": shards, "total": _totals(shards)}
        atomic_write_json(tmp / INDEX_FILE, index)
    return index


def _check_apart(data_dir: Path, out: Path) -> None:
    """OutputError if the shard directory is the dataset, lies in it or holds it: replacing
    `out` as a whole would delete the dataset's files, or put the shards among them."""
    data, shards = data_dir.resolve(), out.resolve()
    if data == shards or data in shards.parents or shards in data.parents:
        raise OutputError(
            f"--out {out}: overlaps the dataset --data {data_dir}; write the shards to a "
            "folder outside it"
        )


def _totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    splits: dict[str, dict[str, int]] = {}
    for shard in shards:
        for name, counts in shard["splits"].items():
            acc = splits.setdefault(name, {"images": 0, "captions": 0})
            for k, v in counts.items():
                acc[k] += v
    return {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards),
        "splits": dict(sorted(splits.items())),
    }


def read_index(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """The index of a shard directory, checked against the files: each shard present, sized as recorded.

    A cheap check for the start of every reader; `validate_shards` reads every byte. An
    index of no shards, or whose totals are not the sums of its shards, is refused.
    """
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_FILE
    index = load_json(path, DataError)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not a vlp shard index (format {INDEX_FORMAT})")
    try:
        if not index["shards"]:
            raise DataError(f"{path}: lists no shards")
        for shard in index["shards"]:
            _check_shard_file(shard_dir, shard)
        if index["total"] != _totals(index["shards"]):
            raise DataError(
                f"{path}: total {index['total']} is not the sum of its shards' counts "
                f"{_totals(index['shards'])}"
            )
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: malformed shard index ({e!r})") from None
    return index


def _check_shard_file(shard_dir: Path, shard: dict[str, Any]) -> None:
    name = shard["name"]
    if not isinstance(name, str) or Path(name).name != name:
        raise DataError(f"{shard_dir / INDEX_FILE}: shard name {name!r} is not a file name")
    size = (shard_dir / name).stat().st_size if (shard_dir / name).is_file() else None
    if size is None:
        raise DataError(f"{shard_dir / name}: shard listed in {INDEX_FILE} not found")
    if size != shard["bytes"]:
        raise DataError(
            f"{shard_dir / name}: {size} bytes, {INDEX_FILE} records {shard['bytes']} "
            "(truncated or rewritten)"
        )
    images = sum(counts["images"] for counts in shard["splits"].values())
    if images != shard["samples"]:
        raise DataError(
            f"{shard_dir / INDEX_FILE}: {name}: {shard['samples']} samples but {images} "
            "images over its splits"
        )


def shard_files(shard_dir: str | os.PathLike) -> set[str]:
    """The files of a shard directory its index accounts for: itself and the shards it lists."""
    index = load_json(Path(shard_dir) / INDEX_FILE, DataError)
    try:
        return {INDEX_FILE, *(str(shard["name"]) for shard in index["shards"])}
    except (KeyError, TypeError) as e:
        raise DataError(f"{Path(shard_dir) / INDEX_FILE}: malformed shard index ({e!r})") from None


index_outputs("shards", shard_files)


def validate_shards(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every shard against the index: sha256, readable tar, one decodable image + JSON
    per sample, counts.

    Returns the index; DataError naming the first bad shard.
    """
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    for shard in index["shards"]:
        path = shard_dir / shard["name"]
        digest = _sha256(path)
        if digest != shard["sha256"]:
            raise DataError(f"{path}: sha256 {digest[:12]}... differs from {INDEX_FILE}")
        check_shard_counts(path, shard, decode=True)
    return index


def check_shard_counts(path: Path, shard: dict[str, Any], decode: bool = False) -> None:
    """DataError unless the tar `path` holds the samples its index entry `shard` records.

    Reads each sample's JSON record (and, with `decode`, decodes its image); DataError
    naming the first sample without one image and one record.
    """
    counts: dict[str, dict[str, int]] = {}
    samples = 0
    try:
        for key, members in _tar_samples(path, read_images=decode):
            record = parse_record(members, key, path)
            images = [ext for ext in members if ext != "json"]
            if len(images) != 1:
                raise DataError(f"{path}: sample {key}: expected one image and one JSON")
            if decode:
                open_image(members[images[0]], path, key).close()
            acc = counts.setdefault(str(record["split"]), {"images": 0, "captions": 0})
            acc["images"] += 1
            acc["captions"] += len(record["captions"])
            samples += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable tar: {e}") from None
    if samples != shard["samples"] or counts != shard["splits"]:
        raise DataError(
            f"{path}: holds {samples} samples {counts}, {INDEX_FILE} records "
            f"{shard['samples']} {shard['splits']}"
        )


def open_image(
    data: bytes, shard: Any, key: Any, before_load: Callable[[Image.Image], Any] | None = None
) -> Image.Image:
    """The decoded image of a sample; DataError naming the shard and sample if it is not one.

    `before_load` is called on the opened image before its pixels are decoded, as in
    `vlp.data.manifest.open_image`.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if before_load is not None:
            before_load(img)
        img.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise DataError(f"{shard}: sample {key}: cannot decode image: {e}") from None
    return img


def _tar_samples(path: Path, read_images: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of consecutive members sharing a key, as webdataset groups them.

    Without `read_images`, only JSON members are read (other members' bytes are empty).
    """
    key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name
            stem, _, ext = name.partition(".")
            if key is not None and stem != key:
                yield key, members
                members = {}
            key = stem
            if ext != "json" and not read_images:
                members[ext] = b""
                continue
            f = tar.extractfile(info)
            members[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, members


def parse_record(members: dict[str, Any], key: str, shard: Any) -> dict[str, Any]:
    raw = members.get("json")
    if raw is None:
        raise DataError(f"{shard}: sample {key} has no JSON record")
    try:
        record = json.loads(raw)
        _ = record["image_id"], record["split"], record["captions"][0]["caption"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{shard}: sample {key}: bad JSON record ({e!r})") from None
    return record
