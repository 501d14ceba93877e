"""`vlp import`: real-format datasets into canonical manifests.

Readers for COCO captions annotations, Karpathy split JSON (COCO, Flickr30k), VQA v2
questions + annotations, and CSV/Parquet tables of (image_path, caption[, split]).

Imports add to a dataset: each one merges its rows into `OUT/pairs.parquet` or
`OUT/vqa.parquet`. Re-importing the same file changes nothing, a caption an image already
has under another id is merged into it; an id that is already there
with other content, an image given a second path, an image put in a second split, or one
image file under two ids in two splits is an error naming it, and the dataset stays as it
was. Splits belong to images: `--split` applies to images not yet in the dataset, an image
already there keeps its split (so VQA v2 questions land on the Karpathy split of their
image). OUT may not be or lie in a folder vlp writes as a whole (one holding the output
marker, such as `vlp generate`'s data/shapes): vlp and `dvc repro` would replace it,
imports and all. How rows are merged and image folders linked: `vlp.data.merging`.

Images stay where they are: a folder inside OUT is referenced directly; a folder elsewhere
is linked as `OUT/images/<folder name>` (recorded in `OUT/image_folders.json`), so manifest
paths stay relative to OUT. DVC versions only the first kind (`dvc add OUT` does not
follow symlinked folders), so a dataset meant for the pipeline keeps its images inside
OUT. Ids must be integers that fit in int64 (JSON numbers without a fraction, integer
table cells), and captions, questions and file names text; an image file that leads through
a symlink out of OUT (other than those links) is refused.
"""

from __future__ import annotations

import argparse
import numbers
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from vlp.data.manifest import (
    IMAGES_DIR,
    PAIRS_FILE,
    SPLITS,
    VQA_FILE,
    split_sizes,
)
from vlp.data.merging import add_rows, join_image_path, next_id, open_dataset
from vlp.errors import DataError
from vlp.io import load_json

# Manifest ids are int64.
_ID_RANGE = range(-(2**63), 2**63)


def _load_json(path: Path) -> Any:
    return load_json(path, DataError)


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing {key!r}")
    return record[key]


def _records(doc: Any, key: str, where: Any) -> list[Any]:
    items = _field(doc, key, str(where))
    if not isinstance(items, list):
        raise DataError(f"{where}: {key!r} must be a list")
    return items


def _objects(doc: Any, key: str, where: Any, sep: str = ": ") -> list[tuple[str, dict]]:
    """(where, record) of each item of the list `doc[key]`; DataError naming one not an object."""
    found = []
    for i, item in enumerate(_records(doc, key, where)):
        here = f"{where}{sep}{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{here}: expected an object, got {item!r}")
        found.append((here, item))
    return found


def _text(record: Any, key: str, where: str, empty: bool = False) -> str:
    """The string `record[key]`; DataError naming it if it is missing, not text, or empty."""
    value = _field(record, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} {value!r} is not text")
    if not empty and not value.strip():
        raise DataError(f"{where}: {key} is empty")
    return value


def _id(value: Any, key: str, where: str) -> int:
    """`value` as an id; DataError naming it unless it is an integer (3.0, "3" and True are not)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) not in _ID_RANGE:
            raise DataError(f"{where}: {key} {value} does not fit in 64 bits")
        return int(value)
    raise DataError(f"{where}: {key} {value!r} is not an integer")


def _id_field(record: Any, key: str, where: str) -> int:
    return _id(_field(record, key, where), key, where)


def _check_split(split: str, where: str) -> str:
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def import_coco(annotations: Path, images: Path, out: Path, split: str = "train") -> dict:
    """COCO captions (`captions_*.json`: images[], annotations[]) added to OUT/pairs.parquet."""
    _check_split(split, "--split")
    doc = _load_json(annotations)
    files = {}
    for where, img in _objects(doc, "images", annotations):
        files[_id_field(img, "id", where)] = _text(img, "file_name", where)
    folder, dataset = open_dataset(images, out)
    rows = []
    for where, ann in _objects(doc, "annotations", annotations):
        image_id = _id_field(ann, "image_id", where)
        if image_id not in files:
            raise DataError(f"{where}: image_id {image_id} is not in images[]")
        rows.append(
            dict(
                caption_id=_id_field(ann, "id", where),
                image_id=image_id,
                image_path=join_image_path(out, folder, files[image_id], where),
                caption=_text(ann, "caption", where).strip(),
                split=dataset.split_of(image_id, split),
            )
        )
    return add_rows(dataset, PAIRS_FILE, rows, folder, str(annotations))


def import_karpathy(split_json: Path, images: Path, out: Path) -> dict:
    """Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json) added to OUT/pairs.parquet.

    image_id is `cocoid` when present (COCO), else `imgid`; caption_id is `sentid`. The
    file's splits are the images' splits.
    """
    doc = _load_json(split_json)
    folder, dataset = open_dataset(images, out)
    rows = []
    for where, img in _objects(doc, "images", split_json):
        image_id = _id_field(img, "cocoid" if "cocoid" in img else "imgid", where)
        name = _text(img, "filename", where)
        has_dir = img.get("filepath") is not None
        subdir = _text(img, "filepath", where, empty=True) if has_dir else ""
        rel = f"{subdir}/{name}" if subdir else name
        split = _check_split(_text(img, "split", where), where)
        for swhere, sent in _objects(img, "sentences", where, sep="."):
            path = join_image_path(out, folder, rel, swhere)
            _check_karpathy_path(dataset, folder, image_id, path, rel, where)
            rows.append(
                dict(
                    caption_id=_id_field(sent, "sentid", swhere) if "sentid" in sent else None,
                    image_id=image_id,
                    image_path=path,
                    caption=_text(sent, "raw", swhere).strip(),
                    split=split,
                )
            )
    return add_rows(dataset, PAIRS_FILE, rows, folder, str(split_json))


def _check_karpathy_path(
    dataset: Any, folder: Any, image_id: int, path: str, rel: str, where: str
) -> None:
    """DataError saying which --images to pass when Karpathy's `filepath/filename` (`rel`),
    joined under --images, misses the image: it is elsewhere in the dataset already, or the
    file is in --images itself rather than in its `filepath` subfolder."""
    known = dataset.path_of(image_id)
    parts = Path(rel).parts
    if known is not None and known != path:
        at = f"{where}: image_id {image_id} is already in {dataset.out} as {known!r}, but "
        at += f"{rel!r} (Karpathy's filepath/filename) under --images {folder.real} is {path!r}"
        if known == rel or known.endswith(f"/{rel}"):  # the folder in OUT that holds it
            raise DataError(f"{at}: pass --images {dataset.out / known[: -len(rel)]}")
        raise DataError(f"{at}: pass as --images a folder in which {rel!r} is that image")
    if len(parts) > 1 and not (folder.real / rel).exists() and (folder.real / parts[-1]).exists():
        inside = folder.real.parts[-(len(parts) - 1) :] == parts[:-1]
        above = folder.real.parents[len(parts) - 2] if inside else f"the folder that holds {rel!r}"
        raise DataError(
            f"{where}: {rel!r} is not under --images {folder.real}, but {parts[-1]!r} is: "
            f"Karpathy's filepath names a subfolder of --images; pass --images {above}"
        )


def _coco_image_names(images: Path) -> dict[int, str]:
    """image_id -> file name, from names ending in the id (COCO_val2014_000000000042.jpg)."""
    names = {}
    for entry in os.scandir(images):
        m = re.search(r"(\d+)\.(?:jpe?g|png)$", entry.name, re.IGNORECASE)
        if m:
            names[int(m.group(1))] = entry.name
    return names


def _answers(ann: dict, where: str) -> list[str]:
    answers = _field(ann, "answers", where)
    if not isinstance(answers, list):
        raise DataError(f"{where}: answers {answers!r} must be a list")
    found = []
    for i, answer in enumerate(answers):
        if not isinstance(answer, dict):
            raise DataError(f"{where}: answers[{i}]: expected an object, got {answer!r}")
        found.append(_text(answer, "answer", f"{where}: answers[{i}]", empty=True))
    return found


def import_vqa(
    questions: Path, annotations: Path, images: Path, out: Path, split: str = "train"
) -> dict:
    """VQA v2 questions + annotations JSON added to OUT/vqa.parquet (answers: the 10 strings).

    A question about an image already in the dataset takes that image's path and split;
    other images are COCO_{data_subtype}_{image_id:012d}.jpg when the questions file names
    its data_subtype, else found in the folder by the id at the end of the name.
    """
    _check_split(split, "--split")
    qdoc, adoc = _load_json(questions), _load_json(annotations)
    anns = {}
    for where, ann in _objects(adoc, "annotations", annotations):
        anns[_id_field(ann, "question_id", where)] = (where, ann)
    subtype = qdoc.get("data_subtype") if isinstance(qdoc, dict) else None
    folder, dataset = open_dataset(images, out)
    by_id = None if subtype else _coco_image_names(images)
    rows = []
    for where, q in _objects(qdoc, "questions", questions):
        qid = _id_field(q, "question_id", where)
        image_id = _id_field(q, "image_id", where)
        if qid not in anns:
            raise DataError(f"{where}: question_id {qid} has no entry in {annotations}")
        awhere, ann = anns[qid]
        path = dataset.path_of(image_id)
        if path is None:
            if by_id is None:
                name = f"COCO_{subtype}_{image_id:012d}.jpg"
            elif image_id in by_id:
                name = by_id[image_id]
            else:
                raise DataError(f"{where}: no image file for image_id {image_id} in {images}")
            path = join_image_path(out, folder, name, where)
        rows.append(
            dict(
                question_id=qid,
                image_id=image_id,
                image_path=path,
                question=_text(q, "question", where).strip(),
                question_type=_text(ann, "question_type", awhere, empty=True),
                answers=_answers(ann, awhere),
                answer_type=_text(ann, "answer_type", awhere),
                multiple_choice_answer=_text(ann, "multiple_choice_answer", awhere, empty=True),
                split=dataset.split_of(image_id, split),
            )
        )
    if not rows:
        raise DataError(f"{questions}: no questions")
    return add_rows(dataset, VQA_FILE, rows, folder, str(questions))


def _table_id(rec: dict[str, Any], key: str, where: str) -> int:
    """An id cell of a table: an integer, or CSV text of one ("7"; not "7.0" or "x7")."""
    value = rec[key]
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value)
    return _id(value, key, where)


def import_table(table: Path, images: Path, out: Path, split: str = "train") -> dict:
    """CSV or Parquet with image_path (relative to --images), caption[, split] -> pairs.

    Optional `image_id` / `caption_id` columns are kept. Without them, an image already in
    the dataset keeps its id and new images get new ones; likewise a caption already there
    for that image keeps its id, so importing the same table twice changes nothing.
    """
    table = Path(table)
    if not table.exists():
        raise DataError(f"{table}: file not found")
    try:
        if table.suffix == ".parquet":
            df = pd.read_parquet(table)
        else:  # ids as text: pandas would turn "7" into 7.0 in a column with a "1.9"
            text = dict.fromkeys(("image_id", "caption_id", "image_path", "caption", "split"), str)
            df = pd.read_csv(table, dtype=text)
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
    folder, dataset = open_dataset(images, out)
    if "split" not in df.columns:
        _check_split(split, "--split")
    image_ids = {path: image_id for image_id, (path, _) in dataset.images.items()}
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        where = f"{table}: row {i}"
        if pd.isna(rec["image_path"]) or pd.isna(rec["caption"]):
            raise DataError(f"{where}: empty image_path or caption")
        path = join_image_path(out, folder, _text(rec, "image_path", where), where)
        if "image_id" in rec:
            image_id = _table_id(rec, "image_id", where)
        else:
            image_id = image_ids.setdefault(path, next_id(image_ids.values()))
        given = _check_split(_text(rec, "split", where), where) if "split" in rec else split
        rows.append(
            dict(
                caption_id=_table_id(rec, "caption_id", where) if "caption_id" in rec else None,
                image_id=image_id,
                image_path=path,
                caption=_text(rec, "caption", where).strip(),
                split=given if "split" in rec else dataset.split_of(image_id, split),
            )
        )
    return add_rows(dataset, PAIRS_FILE, rows, folder, str(table))


def training_settings(data_dir: Path) -> list[str]:
    """`--set` overrides that pretrain on an imported dataset: its splits, no caption warm-up.

    params.yaml holds the shapes world's recipe (its `pretrain` split, the caption warm-up);
    a real dataset trains on what it has, e.g. Karpathy's `train` and `restval`. Empty when
    the dataset has no training split.
    """
    sizes = split_sizes(data_dir)
    training = [name for name in ("pretrain", "train", "restval") if sizes.get(name)]
    if not training:
        return []
    splits = ["pretrain"] if "pretrain" in training else training
    return [
        f"data.root={data_dir}",
        f"pretrain.splits=[{','.join(splits)}]",
        f"pretrain.tokenizer_splits=[{','.join(training)}]",
        "pretrain.caption_warmup_steps=0",
    ]


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
        f"vlp import {args.format}: {summary['added']} rows added -> {summary['manifest']} "
        f"({summary['rows']} rows, {summary['images']} images){note}"
    )
    if "images_link" in summary:
        # `dvc add OUT` skips symlinked folders: those images would not be versioned
        print(
            f"vlp import {args.format}: note: `dvc add {out}` does not version images behind "
            f"a link; to version them, move the folder into {out / IMAGES_DIR}/ and import "
            "from there (docs/reference.md, Data)"
        )
    settings = training_settings(out)
    if settings:
        sets = " ".join(f"--set {shlex.quote(item)}" for item in settings)
        print(
            "params.yaml pretrains the shapes world (docs/reference.md#pretraining); "
            f"to pretrain on this dataset: vlp {sets} pretrain"
        )
    return summary
