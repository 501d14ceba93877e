"""Canonical manifests: the Parquet contract between the data stages and everything after.

A dataset directory DIR holds `DIR/pairs.parquet` (image-caption pairs),
optionally `DIR/vqa.parquet` (questions with 10 answers each, VQA v2 layout), and
images under `DIR/images/`. Every `image_path` is relative to DIR and may not escape it,
neither by its text nor through a symlink (see `locate_image`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from vlp.errors import ConfigError, DataError
from vlp.io import atomic_path, index_outputs

PAIRS_FILE = "pairs.parquet"
VQA_FILE = "vqa.parquet"
IMAGES_DIR = "images"
SHARD_INDEX_FILE = "shards.json"  # the index of a `vlp shard` directory (vlp.data.shards)
IMAGE_FOLDERS_FILE = "image_folders.json"  # the folders `vlp import` linked as images/<name>

SPLITS = ("pretrain", "train", "val", "test", "restval")
ANSWER_TYPES = ("yes/no", "number", "other")
ANSWERS_PER_QUESTION = 10

# column -> pandas dtype written to Parquet; order is the on-disk column order.
PAIRS_SCHEMA: dict[str, str] = {
    "caption_id": "int64",
    "image_id": "int64",
    "image_path": "str",
    "caption": "str",
    "split": "str",
}
VQA_SCHEMA: dict[str, str] = {
    "question_id": "int64",
    "image_id": "int64",
    "image_path": "str",
    "question": "str",
    "question_type": "str",
    "answers": "list",
    "answer_type": "str",
    "multiple_choice_answer": "str",
    "split": "str",
}
SCHEMAS = {PAIRS_FILE: PAIRS_SCHEMA, VQA_FILE: VQA_SCHEMA}

Splits = str | Iterable[str] | None


def _select_splits(df: pd.DataFrame, split: Splits) -> pd.DataFrame:
    if split is None:
        return df
    return df[df["split"].isin(_split_names(split))].reset_index(drop=True)


def _split_names(split: str | Iterable[str]) -> list[str]:
    return [split] if isinstance(split, str) else list(split)


def check_split_names(split: str | Iterable[str], key: str) -> None:
    """ConfigError naming params `key` if it names no split or one that is not in SPLITS."""
    names = _split_names(split)
    unknown = [s for s in names if s not in SPLITS]
    if not names or unknown:
        got = f"unknown split {unknown[0]!r}" if unknown else "no split"
        raise ConfigError(f"{key}: {got}; splits are {', '.join(SPLITS)}")


def split_sizes(data_dir: str | os.PathLike, manifest: str = PAIRS_FILE) -> dict[str, int]:
    """Rows per split of DIR's manifest (`pairs.parquet` or `vqa.parquet`); {} if it is absent."""
    path = Path(data_dir) / manifest
    if not path.exists():
        return {}
    counts = _read(path, {"split": "str"}, None, columns=["split"])["split"].value_counts()
    return {str(name): int(counts[name]) for name in sorted(counts.index)}


def no_rows_in_splits(
    data_dir: str | os.PathLike,
    split: Splits,
    what: str,
    manifest: str = PAIRS_FILE,
    key: str | None = None,
) -> DataError:
    """The DataError for a split selection of DIR with no rows: it names the splits DIR has.

    `key`: the params key that chose the splits, named first.
    """
    sizes = split_sizes(data_dir, manifest)
    has = ", ".join(f"{name}: {n} rows" for name, n in sizes.items()) or "no rows"
    asked = "any split" if split is None else f"split(s) {', '.join(_split_names(split))}"
    prefix = f"{key}: " if key else ""
    return DataError(f"{prefix}{data_dir}: no {what} in {asked}; its {manifest} has {has}")


def require_splits(
    data_dir: str | os.PathLike,
    split: str | Iterable[str],
    key: str,
    what: str = "caption pairs",
    manifest: str = PAIRS_FILE,
) -> None:
    """Check that params `key` names known splits and DIR's manifest has rows in them.

    Splits DIR lacks are fine as long as one has rows (Flickr30k's Karpathy split has no
    `restval`). ConfigError for a bad name; DataError naming DIR, the splits asked for
    and the splits it has.
    """
    check_split_names(split, key)
    sizes = split_sizes(data_dir, manifest)
    if not any(sizes.get(name) for name in _split_names(split)):
        if not (Path(data_dir) / manifest).exists():
            raise DataError(f"{key}: {Path(data_dir) / manifest}: manifest not found")
        raise no_rows_in_splits(data_dir, split, what, manifest, key)


def _read(
    path: Path, schema: dict[str, str], split: Splits, columns: list[str] | None = None
) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    try:
        df = pd.read_parquet(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    if "answers" in schema:
        df["answers"] = df["answers"].map(lambda a: [] if a is None else [str(x) for x in a])
    return _select_splits(df, split)


def read_pairs(data_dir: str | os.PathLike, split: Splits = None) -> pd.DataFrame:
    """Image-caption pairs of DIR (optionally only the given split or splits)."""
    return _read(Path(data_dir) / PAIRS_FILE, PAIRS_SCHEMA, split)


def read_vqa(data_dir: str | os.PathLike, split: Splits = None) -> pd.DataFrame:
    """VQA questions of DIR; `answers` is a Python list of str per row."""
    return _read(Path(data_dir) / VQA_FILE, VQA_SCHEMA, split)


def has_vqa(data_dir: str | os.PathLike) -> bool:
    """Whether DIR has a VQA manifest (caption-only imports do not)."""
    return (Path(data_dir) / VQA_FILE).exists()


def conform(df: pd.DataFrame, schema: dict[str, str], where: str = "manifest") -> pd.DataFrame:
    """Columns of `schema` in order with its dtypes; raises DataError naming a missing column."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}")
    out = pd.DataFrame(index=range(len(df)))
    for col, dtype in schema.items():
        values = df[col].reset_index(drop=True)
        if dtype == "list":
            out[col] = values.map(lambda a: [str(x) for x in a] if a is not None else None)
        else:
            try:
                out[col] = values.astype(dtype)
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: column {col} is not {dtype}: {e}") from e
    return out


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a manifest atomically; `pairs.parquet`/`vqa.parquet` are cast to their schema."""
    path = Path(path)
    schema = SCHEMAS.get(path.name)
    if schema is not None:
        df = conform(df, schema, str(path))
    with atomic_path(path) as tmp:
        # Fixed writer settings so the same rows give byte-identical files (DVC caching).
        df.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")


def resolve_image(data_dir: str | os.PathLike, rel: str) -> Path:
    """DIR/rel for a manifest `image_path`; DataError if it is absolute or escapes DIR.

    The check is lexical on purpose: `DIR/images` may be a symlink to an image folder
    elsewhere (imports do this), which is fine as long as the manifest path stays inside.
    """
    text = str(rel)
    if not text or "\\" in text:
        raise DataError(f"image_path {text!r} is empty or uses backslashes")
    pure = PurePosixPath(text)
    if pure.is_absolute() or Path(text).is_absolute():
        raise DataError(f"image_path {text!r} is absolute; it must be relative to {data_dir}")
    norm = os.path.normpath(text)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise DataError(f"image_path {text!r} escapes the data root {data_dir}")
    return Path(data_dir) / norm


def image_roots(data_dir: str | os.PathLike) -> tuple[Path, ...]:
    """Real folders the images of DIR may lie in: DIR and the image folders `vlp import` linked.

    `vlp import` references each image folder outside DIR by one link, `DIR/images/<name>`
    (or, in datasets imported from a single folder by earlier versions, `DIR/images` itself);
    any other symlink that leads out of DIR is refused.
    """
    data_dir = Path(data_dir)
    roots = [data_dir.resolve()]
    images = data_dir / IMAGES_DIR
    if images.is_symlink():
        roots.append(images.resolve())
    else:
        for name, target in image_folders(data_dir).items():
            link = images / name
            # a link re-pointed since the import no longer counts as declared
            if link.is_symlink() and str(link.resolve()) == target:
                roots.append(Path(target))
    return tuple(roots)


def image_folders(data_dir: str | os.PathLike) -> dict[str, str]:
    """The image folders `vlp import` linked into DIR: link name -> real folder."""
    path = Path(data_dir) / IMAGE_FOLDERS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise DataError(f"{path}: expected an object of link name -> folder")
    return record


def locate_image(
    data_dir: str | os.PathLike, rel: str, roots: tuple[Path, ...] | None = None
) -> Path:
    """`resolve_image`, and DataError if the file, symlinks followed, lies outside image_roots.

    Pass `roots` (from `image_roots`) when locating many images of one dataset.
    """
    path = resolve_image(data_dir, rel)
    real = path.resolve()
    for root in roots if roots is not None else image_roots(data_dir):
        if real == root or root in real.parents:
            return path
    raise DataError(
        f"image_path {str(rel)!r} leads through a symlink to {real}, outside the data root "
        f"{data_dir}"
    )


def open_image(path: Path, before_load: Callable[[Image.Image], Any] | None = None) -> Image.Image:
    """The image at `path`, decoded; DataError naming the file if missing or corrupt.

    `before_load` is called on the opened image before its pixels are decoded (to set up
    a reduced-scale decode, `vlp.data.decode.reduce_jpeg`).
    """
    try:
        with Image.open(path) as img:
            if before_load is not None:
                before_load(img)
            img.load()
            return img
    except FileNotFoundError as e:
        raise DataError(f"{path}: image not found") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to open: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e


def dataset_hash(data_dir: str | os.PathLike) -> str:
    """Identity of a dataset directory's contents: its manifests and the images they name.

    Manifests count byte for byte, images by path and size: a dataset directory's images
    are never rewritten in place (imports add files), and reading every image of a large
    dataset would cost minutes each time the hash is taken. A directory without manifests
    (an image-folder tree, `DIR/<class>/<image>`) counts every file in it, by the same rule.
    """
    root = Path(data_dir)
    digest = hashlib.sha256()
    images: set[str] = set()
    manifests = [root / name for name in (PAIRS_FILE, VQA_FILE) if (root / name).is_file()]
    for path in manifests:
        digest.update(f"{path.name}\n".encode() + path.read_bytes())
        images.update(_read(path, {"image_path": "str"}, None)["image_path"])
    if not manifests:
        images = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for rel in sorted(images):
        image = resolve_image(root, rel)
        size = image.stat().st_size if image.is_file() else -1
        digest.update(f"{rel}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def dataset_files(data_dir: str | os.PathLike) -> set[str]:
    """The files of a dataset directory its manifests account for: themselves and their images."""
    root = Path(data_dir)
    files: set[str] = set()
    for name in (PAIRS_FILE, VQA_FILE):
        path = root / name
        if path.is_file():
            files.add(name)
            paths = _read(path, {"image_path": "str"}, None, columns=["image_path"])
            files.update(os.path.normpath(str(p)) for p in paths["image_path"])
    return files


# `vlp generate` writes datasets: one that holds a file its manifests do not name is the
# user's too, and is not replaced.
index_outputs("dataset", dataset_files)
