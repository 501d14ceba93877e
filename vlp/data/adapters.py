"""`vlp import`: real-format datasets into canonical manifests.

Readers for COCO captions annotations, Karpathy split JSON (COCO, Flickr30k), VQA v2
questions + annotations, and CSV/Parquet tables of (image_path, caption[, split]).
Images stay where they are: a folder inside the output directory is referenced
directly; a folder elsewhere is symlinked as `OUT/images` so manifest paths stay
relative to OUT. Importing a second format into the same OUT keeps the other manifest.
Ids must be integers (JSON numbers without a fraction, integer table cells); an image
file that leads through a symlink out of OUT (other than the `OUT/images` link) is refused.
"""

from __future__ import annotations

import argparse
import numbers
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from vlp.data.manifest import (
    IMAGES_DIR,
    PAIRS_FILE,
    SCHEMAS,
    SPLITS,
    VQA_FILE,
    image_roots,
    locate_image,
    resolve_image,
    write_manifest,
)
from vlp.errors import DataError, OutputError
from vlp.io import load_json


def _load_json(path: Path) -> Any:
    return load_json(path, DataError)


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing {key!r}")
    return record[key]


def _records(doc: Any, key: str, path: Path) -> list[Any]:
    items = _field(doc, key, str(path))
    if not isinstance(items, list):
        raise DataError(f"{path}: {key!r} must be a list")
    return items


def _id(value: Any, key: str, where: str) -> int:
    """`value` as an id; DataError naming it unless it is an integer (3.0, "3" and True are not)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise DataError(f"{where}: {key} {value!r} is not an integer")


def _id_field(record: Any, key: str, where: str) -> int:
    return _id(_field(record, key, where), key, where)


def _check_split(split: str, where: str) -> str:
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def link_images(images: Path, out: Path) -> tuple[str, str | None]:
    """Make `images` reachable from `out`; returns (manifest path prefix, note for the user).

    A folder inside `out` (or inside an existing `out/images`) is used as is; any other
    folder is symlinked as `out/images`.
    """
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    out.mkdir(parents=True, exist_ok=True)
    real_images, real_out = images.resolve(), out.resolve()
    if _is_within(real_images, real_out):
        return real_images.relative_to(real_out).as_posix(), None
    link = out / IMAGES_DIR
    if link.exists() or link.is_symlink():
        target = link.resolve()
        if _is_within(real_images, target):
            rel = real_images.relative_to(target).as_posix()
            return (IMAGES_DIR if rel == "." else f"{IMAGES_DIR}/{rel}"), None
        raise DataError(
            f"{link} already exists and points elsewhere ({target}); "
            f"choose another --out or put the images under it"
        )
    link.symlink_to(real_images, target_is_directory=True)
    return IMAGES_DIR, f"linked {link} -> {real_images}"


def _join(out: Path, prefix: str, rel: str, where: str) -> str:
    """Manifest image_path for `rel` inside the image folder; rejects escaping paths.

    Escaping by text or through a symlink out of OUT and its image folder are both refused.
    """
    rel = str(rel).replace(os.sep, "/")
    try:
        resolve_image(".", rel)
        path = os.path.normpath(f"{prefix}/{rel}" if prefix not in ("", ".") else rel)
        locate_image(out, path, image_roots(out))
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    return path


def import_coco(annotations: Path, images: Path, out: Path, split: str = "train") -> dict:
    """COCO captions (`captions_*.json`: images[], annotations[]) -> OUT/pairs.parquet."""
    _check_split(split, "--split")
    doc = _load_json(annotations)
    files = {}
    for i, img in enumerate(_records(doc, "images", annotations)):
        where = f"{annotations}: images[{i}]"
        files[_id_field(img, "id", where)] = str(_field(img, "file_name", where))
    prefix, note = link_images(images, out)
    rows = []
    for i, ann in enumerate(_records(doc, "annotations", annotations)):
        where = f"{annotations}: annotations[{i}]"
        image_id = _id_field(ann, "image_id", where)
        if image_id not in files:
            raise DataError(f"{where}: image_id {image_id} is not in images[]")
        rows.append(
            dict(
                caption_id=_id_field(ann, "id", where),
                image_id=image_id,
                image_path=_join(out, prefix, files[image_id], where),
                caption=str(_field(ann, "caption", where)).strip(),
                split=split,
            )
        )
    return _write_pairs(rows, out, note)


def import_karpathy(split_json: Path, images: Path, out: Path) -> dict:
    """Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json) -> OUT/pairs.parquet.

    image_id is `cocoid` when present (COCO), else `imgid`; caption_id is `sentid`.
    """
    doc = _load_json(split_json)
    prefix, note = link_images(images, out)
    rows = []
    for i, img in enumerate(_records(doc, "images", split_json)):
        where = f"{split_json}: images[{i}]"
        image_id = _id_field(img, "cocoid" if "cocoid" in img else "imgid", where)
        name = str(_field(img, "filename", where))
        rel = f"{img['filepath']}/{name}" if img.get("filepath") else name
        split = _check_split(str(_field(img, "split", where)), where)
        for j, sent in enumerate(_field(img, "sentences", where)):
            swhere = f"{where}.sentences[{j}]"
            rows.append(
                dict(
                    caption_id=_id_field(sent, "sentid", swhere) if "sentid" in sent else len(rows),
                    image_id=image_id,
                    image_path=_join(out, prefix, rel, swhere),
                    caption=str(_field(sent, "raw", swhere)).strip(),
                    split=split,
                )
            )
    return _write_pairs(rows, out, note)


def _coco_image_names(images: Path) -> dict[int, str]:
    """image_id -> file name, from names ending in the id (COCO_val2014_000000000042.jpg)."""
    names = {}
    for entry in os.scandir(images):
        m = re.search(r"(\d+)\.(?:jpe?g|png)$", entry.name, re.IGNORECASE)
        if m:
            names[int(m.group(1))] = entry.name
    return names


def import_vqa(
    questions: Path, annotations: Path, images: Path, out: Path, split: str = "train"
) -> dict:
    """VQA v2 questions + annotations JSON -> OUT/vqa.parquet (answers: the 10 strings).

    Image files are COCO_{data_subtype}_{image_id:012d}.jpg when the questions file
    names its data_subtype, else found in the folder by the id at the end of the name.
    """
    _check_split(split, "--split")
    qdoc, adoc = _load_json(questions), _load_json(annotations)
    anns = {}
    for i, ann in enumerate(_records(adoc, "annotations", annotations)):
        anns[_id_field(ann, "question_id", f"{annotations}: annotations[{i}]")] = (i, ann)
    subtype = qdoc.get("data_subtype") if isinstance(qdoc, dict) else None
    by_id = None if subtype else _coco_image_names(images)
    prefix, note = link_images(images, out)
    rows = []
    for i, q in enumerate(_records(qdoc, "questions", questions)):
        where = f"{questions}: questions[{i}]"
        qid = _id_field(q, "question_id", where)
        image_id = _id_field(q, "image_id", where)
        if qid not in anns:
            raise DataError(f"{where}: question_id {qid} has no entry in {annotations}")
        j, ann = anns[qid]
        awhere = f"{annotations}: annotations[{j}]"
        if by_id is None:
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
        elif image_id in by_id:
            name = by_id[image_id]
        else:
            raise DataError(f"{where}: no image file for image_id {image_id} in {images}")
        answers = [str(_field(a, "answer", awhere)) for a in _field(ann, "answers", awhere)]
        rows.append(
            dict(
                question_id=qid,
                image_id=image_id,
                image_path=_join(out, prefix, name, where),
                question=str(_field(q, "question", where)).strip(),
                question_type=str(_field(ann, "question_type", awhere)),
                answers=answers,
                answer_type=str(_field(ann, "answer_type", awhere)),
                multiple_choice_answer=str(_field(ann, "multiple_choice_answer", awhere)),
                split=split,
            )
        )
    if not rows:
        raise DataError(f"{questions}: no questions")
    _write_import(rows, Path(out) / VQA_FILE)
    return _report(out, VQA_FILE, len(rows), len({r["image_id"] for r in rows}), note)


def _table_id(rec: dict[str, Any], key: str, where: str) -> int:
    """An id cell of a table: an integer, or CSV text of one ("7"; not "7.0" or "x7")."""
    value = rec[key]
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return _id(value, key, where)


def import_table(table: Path, images: Path, out: Path, split: str = "train") -> dict:
    """CSV or Parquet with image_path (relative to --images), caption[, split] -> pairs.

    Optional `image_id` / `caption_id` columns are kept; otherwise ids are assigned in
    order of first appearance.
    """
    table = Path(table)
    if not table.exists():
        raise DataError(f"{table}: file not found")
    try:
        if table.suffix == ".parquet":
            df = pd.read_parquet(table)
        else:  # ids as text: pandas would turn "7" into 7.0 in a column with a "1.9"
            df = pd.read_csv(table, dtype={"image_id": str, "caption_id": str})
    except Exception as e:  # pandas/pyarrow raise many types for a malformed table
        raise DataError(f"{table}: cannot read table: {e}") from e
    for col in ("image_path", "caption"):
        if col not in df.columns:
            raise DataError(f"{table}: missing column {col!r}")
    for col in ("image_id", "caption_id"):
        # checked first: one empty cell turns a Parquet column of integers into floats
        empty = df[col].isna().to_numpy().nonzero()[0] if col in df.columns else []
        if len(empty):
            raise DataError(f"{table}: row {empty[0]}: {col} is empty")
    prefix, note = link_images(images, out)
    if "split" not in df.columns:
        _check_split(split, "--split")
        df["split"] = split
    ids: dict[str, int] = {}
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        where = f"{table}: row {i}"
        if pd.isna(rec["image_path"]) or pd.isna(rec["caption"]):
            raise DataError(f"{where}: empty image_path or caption")
        path = _join(out, prefix, str(rec["image_path"]), where)
        image_id = (
            _table_id(rec, "image_id", where)
            if "image_id" in rec
            else ids.setdefault(path, len(ids))
        )
        rows.append(
            dict(
                caption_id=_table_id(rec, "caption_id", where) if "caption_id" in rec else i,
                image_id=image_id,
                image_path=path,
                caption=str(rec["caption"]).strip(),
                split=_check_split(str(rec["split"]), where),
            )
        )
    return _write_pairs(rows, out, note)


def _write_import(rows: list[dict], path: Path) -> None:
    """Write a manifest; an earlier import's may be replaced, any other file of that name not."""
    import pyarrow.parquet as pq

    if path.exists() or path.is_symlink():
        try:
            columns = set(pq.read_schema(path).names)
        except (OSError, ValueError):  # not Parquet, a folder, a dangling link
            columns = set()
        if not set(SCHEMAS[path.name]) <= columns:
            raise OutputError(
                f"{path}: exists and is not a vlp manifest; vlp will not replace it: "
                f"move it away or choose another --out"
            )
    write_manifest(pd.DataFrame(rows), path)


def _write_pairs(rows: list[dict], out: Path, note: str | None) -> dict:
    if not rows:
        raise DataError(f"nothing to import into {out}: no captions found")
    _write_import(rows, Path(out) / PAIRS_FILE)
    return _report(out, PAIRS_FILE, len(rows), len({r["image_id"] for r in rows}), note)


def _report(out: Path, manifest: str, rows: int, images: int, note: str | None) -> dict:
    summary = {"manifest": str(Path(out) / manifest), "rows": rows, "images": images}
    if note:
        summary["images_link"] = note
    return summary


def run_import(args: argparse.Namespace) -> dict:
    """`vlp import FORMAT ...`: dispatch to the reader for args.format and print a summary."""
    out, images = Path(args.out), Path(args.images)
    if args.format == "coco":
        summary = import_coco(Path(args.annotations), images, out, args.split)
    elif args.format == "karpathy":
        summary = import_karpathy(Path(args.split_json), images, out)
    elif args.format == "vqa":
        summary = import_vqa(Path(args.questions), Path(args.annotations), images, out, args.split)
    elif args.format == "table":
        summary = import_table(Path(args.table), images, out, args.split)
    else:
        raise DataError(f"unknown import format {args.format!r}")
    note = f" ({summary['images_link']})" if "images_link" in summary else ""
    print(
        f"vlp import {args.format}: {summary['rows']} rows, {summary['images']} images "
        f"-> {summary['manifest']}{note}"
    )
    return summary
