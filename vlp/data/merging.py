"""Adding imported rows to a dataset directory: its manifests, image folders and splits.

Imports add to a dataset: each one merges its rows into `OUT/pairs.parquet` or
`OUT/vqa.parquet`. Re-importing the same file changes nothing, a caption an image already
has under another id is merged into it; an id that is already there
with other content, an image given a second path, an image put in a second split, or one
image file under two ids in two splits is an error naming it, and the dataset stays as it
was. Splits belong to images: an image already in the dataset keeps its split. OUT may not
be or lie in a folder vlp writes as a whole (one holding the output marker, such as
`vlp generate`'s data/shapes): vlp and `dvc repro` would replace it, imports and all.

Images stay where they are: a folder inside OUT is referenced directly; a folder elsewhere
is linked as `OUT/images/<folder name>` (recorded in `OUT/image_folders.json`), so manifest
paths stay relative to OUT. An image file that leads through a symlink out of OUT (other
than those links) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlp.data.manifest import (
    IMAGE_FOLDERS_FILE,
    IMAGES_DIR,
    PAIRS_FILE,
    SCHEMAS,
    VQA_FILE,
    conform,
    image_folders,
    image_roots,
    read_pairs,
    read_vqa,
    resolve_image,
    write_manifest,
)
from vlp.errors import DataError, OutputError
from vlp.io import OUTPUT_MARKER, atomic_write_json, check_writable


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class ImageFolder:
    """Where an imported image folder's files are found, before anything is written.

    `prefix`: manifest path of the folder relative to OUT; `real`: the folder itself;
    `link`: the link `OUT/images/<name>` to create for it (None if it is reachable already).
    """

    prefix: str
    real: Path
    link: Path | None = None
    used: bool = False  # whether any imported row lies in it (else no link is made)

    def note(self) -> str | None:
        return f"linked {self.link} -> {self.real}" if self.link else None


def plan_image_folder(images: Path, out: Path) -> ImageFolder:
    """How `images` is reached from `out`: inside it, through an existing link, or a new link."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    real, real_out = images.resolve(), out.resolve()
    if _is_within(real, real_out):
        return ImageFolder(real.relative_to(real_out).as_posix(), real)
    base = out / IMAGES_DIR
    if base.is_symlink() or (base.exists() and not base.is_dir()):
        # a dataset imported from one folder by an earlier version: OUT/images is the link
        target = base.resolve()
        if _is_within(real, target):
            rel = real.relative_to(target).as_posix()
            return ImageFolder(IMAGES_DIR if rel == "." else f"{IMAGES_DIR}/{rel}", real)
        raise DataError(
            f"{base} already links to {target}; import images from under it or choose another --out"
        )
    links = [e for e in base.iterdir() if e.is_symlink()] if base.is_dir() else []
    for link in sorted(links):
        target = link.resolve()
        if _is_within(real, target):
            rel = real.relative_to(target).as_posix()
            prefix = f"{IMAGES_DIR}/{link.name}"
            return ImageFolder(prefix if rel == "." else f"{prefix}/{rel}", real)
    name, n = real.name or "images", 1
    while (base / name).exists() or (base / name).is_symlink():
        n += 1
        name = f"{real.name}-{n}"
    return ImageFolder(f"{IMAGES_DIR}/{name}", real, base / name)


def join_image_path(out: Path, folder: ImageFolder, rel: str, where: str) -> str:
    """Manifest image_path for `rel` inside the image folder; rejects escaping paths.

    Escaping by text or through a symlink out of the folder's dataset roots are both refused.
    """
    rel = str(rel).replace(os.sep, "/")
    try:
        resolve_image(".", rel)
        path = os.path.normpath(f"{folder.prefix}/{rel}" if folder.prefix not in ("", ".") else rel)
        real = (folder.real / rel).resolve()
        roots = (*image_roots(out), folder.real)
        if not any(_is_within(real, root) for root in roots):
            raise DataError(
                f"image_path {path!r} leads through a symlink to {real}, outside the data root {out}"
            )
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    folder.used = True
    return path


@dataclass
class Dataset:
    """What a dataset directory already holds: its manifests and each image's path and split."""

    out: Path
    manifests: dict[str, pd.DataFrame]
    images: dict[int, tuple[str, str]]  # image_id -> (image_path, split)

    @classmethod
    def read(cls, out: Path) -> Dataset:
        manifests = {}
        for name in (PAIRS_FILE, VQA_FILE):
            path = Path(out) / name
            if path.exists() or path.is_symlink():
                _check_is_manifest(path)
                manifests[name] = read_pairs(out) if name == PAIRS_FILE else read_vqa(out)
        images: dict[int, tuple[str, str]] = {}
        for df in manifests.values():
            for image_id, path, split in zip(
                df["image_id"], df["image_path"], df["split"], strict=True
            ):
                images.setdefault(int(image_id), (str(path), str(split)))
        return cls(Path(out), manifests, images)

    def split_of(self, image_id: int, default: str) -> str:
        """The split an image already has, else `default` (the import's --split)."""
        known = self.images.get(image_id)
        return known[1] if known else default

    def path_of(self, image_id: int) -> str | None:
        known = self.images.get(image_id)
        return known[0] if known else None


def _check_is_manifest(path: Path) -> None:
    """OutputError unless `path` is a vlp manifest (an import may replace only those)."""
    import pyarrow.parquet as pq

    try:
        columns = set(pq.read_schema(path).names)
    except (OSError, ValueError):  # not Parquet, a folder, a dangling link
        columns = set()
    if not set(SCHEMAS[path.name]) <= columns:
        raise OutputError(
            f"{path}: exists and is not a vlp manifest; vlp will not replace it: "
            f"move it away or choose another --out"
        )


def open_dataset(images: Path, out: Path) -> tuple[ImageFolder, Dataset]:
    """The image folder's place in OUT and what OUT holds, once OUT is known to take an import."""
    check_import_out(out)
    return plan_image_folder(images, out), Dataset.read(out)


def check_import_out(out: Path) -> None:
    """OutputError unless OUT may take imported rows: writable, and not in a folder vlp replaces.

    A folder holding vlp's output marker (`vlp generate`'s data/shapes, a shard directory)
    is rewritten as a whole by vlp and by `dvc repro`/`dvc checkout`: rows and images
    imported into it would be lost.
    """
    out = Path(out)
    for folder in (out, *out.absolute().parents):
        if (folder / OUTPUT_MARKER).is_file():
            raise OutputError(
                f"--out {out}: {folder} is a folder vlp writes (it holds {OUTPUT_MARKER}) "
                "and replaces as a whole, with whatever was imported into it; "
                "import into another folder"
            )
    check_writable({f"--out {out}": out})


def next_id(ids: Any) -> int:
    return max(ids, default=-1) + 1


def _assign_caption_ids(rows: list[dict], existing: pd.DataFrame | None) -> None:
    """Give rows without a caption_id the id of the same caption of the same image, or a new one."""
    known: dict[tuple[int, str], int] = {}
    taken = set()
    if existing is not None:
        for cid, iid, text in zip(
            existing["caption_id"], existing["image_id"], existing["caption"], strict=True
        ):
            known.setdefault((int(iid), str(text)), int(cid))
            taken.add(int(cid))
    taken |= {r["caption_id"] for r in rows if r["caption_id"] is not None}
    nxt = next_id(taken)
    for row in rows:
        if row["caption_id"] is None:
            key = (row["image_id"], row["caption"])
            if key not in known:
                known[key], nxt = nxt, nxt + 1
            row["caption_id"] = known[key]


def _merged(dataset: Dataset, name: str, rows: list[dict], source: str) -> pd.DataFrame:
    """The manifest `name` with `rows` added; DataError naming the first conflict.

    A row whose id is already there with the same content is dropped (re-imports change
    nothing), and so is a caption an image already has under another id (the same pair from
    another source, whitespace aside); the same id with other content, and an image with a
    second path or split (in either manifest), are conflicts.
    """
    key = "caption_id" if name == PAIRS_FILE else "question_id"
    schema = SCHEMAS[name]
    new = conform(pd.DataFrame(rows), schema, source)
    old = dataset.manifests.get(name)
    both = new if old is None else pd.concat([old, new], ignore_index=True)
    # one comparable text per row: lists (answers) as tuples
    content = both.apply(
        lambda r: repr(tuple(tuple(v) if isinstance(v, list) else v for v in r)), axis=1
    )
    unique = ~content.duplicated()
    if name == PAIRS_FILE:
        # one image's caption imported twice under two ids (Karpathy's sentid, COCO's id) is
        # one pair: the first row is kept (rows already in the dataset stay as they are)
        is_new = pd.Series(both.index >= (0 if old is None else len(old)), index=both.index)
        unique &= ~(_same_pair(both).duplicated() & is_new)
    both = both[unique].reset_index(drop=True)
    clash = both[key].duplicated(keep=False)
    if clash.any():
        ident = int(both.loc[clash, key].iloc[0])
        rows_of = both[both[key] == ident]
        a, b = rows_of.iloc[0], rows_of.iloc[1]
        differs = [c for c in schema if repr(a[c]) != repr(b[c])]
        where = f"{dataset.out / name}" if old is not None and ident in set(old[key]) else source
        raise DataError(
            f"{source}: {key} {ident} is already in {where} with another "
            + ", ".join(f"{c} ({_plain(a[c])!r} vs {_plain(b[c])!r})" for c in differs)
        )
    others = [df for n, df in dataset.manifests.items() if n != name]
    _check_images(pd.concat([*others, both], ignore_index=True), source)
    return both.sort_values(key, kind="stable").reset_index(drop=True)


def _same_pair(pairs: pd.DataFrame) -> pd.Series:
    """(image_id, caption with its whitespace collapsed) of each row: equal for one pair."""
    captions = pairs["caption"].map(lambda c: " ".join(str(c).split()))
    return pd.Series(list(zip(pairs["image_id"], captions, strict=True)), index=pairs.index)


def _plain(value: Any) -> Any:
    """A manifest cell as plain Python (numpy scalars print as their value)."""
    return value.item() if hasattr(value, "item") else value


def _check_images(df: pd.DataFrame, source: str) -> None:
    """DataError naming the first image with two paths or two splits across the manifests, or
    the first image file that is in two splits under two ids."""
    for column, what in (("image_path", "path"), ("split", "split")):
        values = df.groupby("image_id")[column].unique()
        bad = values[values.map(len) > 1]
        if len(bad):
            image_id, found = int(bad.index[0]), sorted(bad.iloc[0])
            raise DataError(
                f"{source}: image_id {image_id} would have two {what}s: "
                + " and ".join(repr(_plain(v)) for v in found)
            )
    # one file under two ids: its splits must agree, or a test image is also trained on
    splits = df.groupby("image_path")["split"].nunique()
    for path in splits[splits > 1].index[:1]:
        ids = df[df["image_path"] == path].drop_duplicates(["image_id", "split"])
        raise DataError(
            f"{source}: image file {path!r} would be in two splits: "
            + " and ".join(
                f"image_id {int(i)} ({s})"
                for i, s in zip(ids["image_id"], ids["split"], strict=True)
            )
        )


def add_rows(
    dataset: Dataset, name: str, rows: list[dict], folder: ImageFolder, source: str
) -> dict:
    """Merge `rows` into the manifest `name` of the dataset, linking the image folder if new.

    Everything is checked before anything is written; the link and the manifest are
    written last, and the link is taken back if the manifest cannot be written.
    """
    if not rows:
        raise DataError(f"{source}: nothing to import into {dataset.out}: no rows found")
    if name == PAIRS_FILE:
        _assign_caption_ids(rows, dataset.manifests.get(name))
    merged = _merged(dataset, name, rows, source)
    if not folder.used:
        folder.link = None
    if folder.link is not None:
        folders = image_folders(dataset.out)
        folder.link.parent.mkdir(parents=True, exist_ok=True)
        folder.link.symlink_to(folder.real, target_is_directory=True)
    try:
        if folder.link is not None:
            folders[folder.link.name] = str(folder.real)
            atomic_write_json(dataset.out / IMAGE_FOLDERS_FILE, folders)
        write_manifest(merged, dataset.out / name)
    except BaseException:
        if folder.link is not None:
            folder.link.unlink(missing_ok=True)
            folders.pop(folder.link.name)
            atomic_write_json(dataset.out / IMAGE_FOLDERS_FILE, folders)
        raise
    before = dataset.manifests.get(name)
    summary = {
        "manifest": str(dataset.out / name),
        "rows": len(merged),
        "added": len(merged) - (0 if before is None else len(before)),
        # rows not added: already there, or the same pair under another id
        "merged": len(rows) - (len(merged) - (0 if before is None else len(before))),
        "images": int(merged["image_id"].nunique()),
    }
    if folder.note():
        summary["images_link"] = folder.note()
    return summary
