"""`vlp import`: each real format, written exactly as distributed, becomes valid manifests."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlp.cli import main
from vlp.data.adapters import import_coco, import_karpathy, import_table, import_vqa
from vlp.data.manifest import read_pairs, read_vqa
from vlp.data.validation import validate_dataset
from vlp.errors import DataError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _image(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    Image.new("RGB", (24, 20), color).save(path, format=fmt)


def _dump(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def coco_images(tmp_path) -> Path:
    root = tmp_path / "coco" / "val2014"
    for image_id, color in ((42, (255, 0, 0)), (73, (0, 0, 255))):
        _image(root / _coco_name(image_id), color)
    return root


def test_coco_captions_with_images_outside_out(smoke_cfg, tmp_path, coco_images):
    ann = _dump(
        tmp_path / "captions_val2014.json",
        {
            "info": {},
            "images": [
                {"id": 42, "file_name": _coco_name(42), "width": 24, "height": 20},
                {"id": 73, "file_name": _coco_name(73), "width": 24, "height": 20},
            ],
            "annotations": [
                {"id": 1, "image_id": 42, "caption": "A red square on its own.\n"},
                {"id": 2, "image_id": 42, "caption": " a red picture"},
                {"id": 3, "image_id": 73, "caption": "A blue picture."},
            ],
        },
    )
    out = tmp_path / "out"
    summary = import_coco(ann, coco_images, out, split="val")
    assert summary["rows"] == 3 and summary["images"] == 2 and "images_link" in summary
    assert (out / "images" / "val2014").is_symlink()
    pairs = read_pairs(out)
    assert list(pairs["caption"]) == [
        "A red square on its own.",
        "a red picture",
        "A blue picture.",
    ]
    assert list(pairs["image_path"]) == [f"images/val2014/{_coco_name(42)}"] * 2 + [
        f"images/val2014/{_coco_name(73)}"
    ]
    assert set(pairs["split"]) == {"val"}
    assert validate_dataset(out, smoke_cfg.validate)["success"]


def test_coco_annotation_of_unknown_image_is_named(tmp_path, coco_images):
    ann = _dump(
        tmp_path / "c.json",
        {"images": [], "annotations": [{"id": 1, "image_id": 5, "caption": "x"}]},
    )
    with pytest.raises(DataError, match=r"annotations\[0\]: image_id 5"):
        import_coco(ann, coco_images, tmp_path / "out")


def test_karpathy_coco_and_vqa_into_one_dir(smoke_cfg, tmp_path, coco_images):
    split_json = _dump(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                {
                    "filepath": "val2014",
                    "filename": _coco_name(42),
                    "imgid": 0,
                    "split": "test",
                    "sentences": [
                        {
                            "tokens": ["a", "red", "square"],
                            "raw": "A red square.",
                            "imgid": 0,
                            "sentid": 10,
                        },
                        {"tokens": ["red"], "raw": "Red.", "imgid": 0, "sentid": 11},
                    ],
                    "cocoid": 42,
                    "sentids": [10, 11],
                },
                {
                    "filepath": "val2014",
                    "filename": _coco_name(73),
                    "imgid": 1,
                    "split": "restval",
                    "sentences": [
                        {"tokens": ["blue"], "raw": "Blue thing", "imgid": 1, "sentid": 12}
                    ],
                    "cocoid": 73,
                    "sentids": [12],
                },
            ],
        },
    )
    out = tmp_path / "out"
    import_karpathy(split_json, coco_images.parent, out)
    pairs = read_pairs(out)
    assert list(pairs["caption_id"]) == [10, 11, 12]
    assert list(pairs["image_id"]) == [42, 42, 73]
    assert list(pairs["split"]) == ["test", "test", "restval"]
    assert pairs["image_path"].iloc[0] == f"images/coco/val2014/{_coco_name(42)}"

    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(["2"] * 8 + ["two", "3"])
    ]
    questions = _dump(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 73, "question": "How many things are blue?", "question_id": 73000}
            ],
            "license": {},
        },
    )
    annotations = _dump(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {
            "data_subtype": "val2014",
            "annotations": [
                {
                    "question_type": "how many",
                    "multiple_choice_answer": "2",
                    "answers": answers,
                    "image_id": 73,
                    "answer_type": "number",
                    "question_id": 73000,
                }
            ],
        },
    )
    # The VQA images live inside the folder that the Karpathy import linked as out/images/coco.
    import_vqa(questions, annotations, coco_images, out, split="restval")
    vqa = read_vqa(out)
    row = vqa.iloc[0]
    assert row["answers"] == ["2"] * 8 + ["two", "3"]
    assert row["image_path"] == f"images/coco/val2014/{_coco_name(73)}"
    assert (row["question_type"], row["answer_type"], row["multiple_choice_answer"]) == (
        "how many",
        "number",
        "2",
    )
    assert len(read_pairs(out)) == 3  # the caption manifest is kept
    summary = validate_dataset(out, smoke_cfg.validate)
    assert summary["success"], summary["failures"]


def test_flickr_karpathy_without_filepath_or_cocoid(tmp_path):
    images = tmp_path / "out" / "flickr30k-images"
    _image(images / "1000092795.jpg", (0, 255, 0))
    split_json = _dump(
        tmp_path / "dataset_flickr30k.json",
        {
            "dataset": "flickr30k",
            "images": [
                {
                    "filename": "1000092795.jpg",
                    "imgid": 7,
                    "split": "train",
                    "sentences": [{"raw": "Two young guys.", "imgid": 7, "sentid": 35}],
                }
            ],
        },
    )
    summary = import_karpathy(split_json, images, tmp_path / "out")
    assert "images_link" not in summary  # images inside --out are referenced in place
    pairs = read_pairs(tmp_path / "out")
    assert (pairs.loc[0, "image_id"], pairs.loc[0, "image_path"]) == (
        7,
        "flickr30k-images/1000092795.jpg",
    )


def test_vqa_without_subtype_finds_images_by_id(tmp_path, coco_images):
    q = _dump(
        tmp_path / "q.json",
        {"questions": [{"image_id": 42, "question": "Is it red?", "question_id": 1}]},
    )
    a = _dump(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 1,
                    "image_id": 42,
                    "question_type": "is it",
                    "answer_type": "yes/no",
                    "multiple_choice_answer": "yes",
                    "answers": [
                        {"answer": "yes", "answer_confidence": "yes", "answer_id": i}
                        for i in range(10)
                    ],
                }
            ]
        },
    )
    import_vqa(q, a, coco_images, tmp_path / "out", split="val")
    assert read_vqa(tmp_path / "out").loc[0, "image_path"] == f"images/val2014/{_coco_name(42)}"


def test_table_csv_and_parquet(smoke_cfg, tmp_path):
    images = tmp_path / "pics"
    _image(images / "a.png", (255, 255, 0))
    _image(images / "sub" / "b.jpg", (0, 255, 255))
    csv = tmp_path / "pairs.csv"
    pd.DataFrame(
        {
            "image_path": ["a.png", "a.png", "sub/b.jpg"],
            "caption": ["a yellow square", "yellow", "a cyan one"],
            "split": ["train", "train", "test"],
        }
    ).to_csv(csv, index=False)
    code = main(
        [
            "--params",
            str(REPO_PARAMS),
            "import",
            "table",
            "--table",
            str(csv),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "csv_out"),
        ]
    )
    assert code == 0
    pairs = read_pairs(tmp_path / "csv_out")
    assert list(pairs["image_id"]) == [0, 0, 1]
    assert list(pairs["image_path"]) == [
        "images/pics/a.png",
        "images/pics/a.png",
        "images/pics/sub/b.jpg",
    ]
    assert validate_dataset(tmp_path / "csv_out", smoke_cfg.validate)["success"]

    pq = tmp_path / "pairs.parquet"
    pd.DataFrame({"image_path": ["a.png"], "caption": ["yellow"]}).to_parquet(pq)
    import_table(pq, images, tmp_path / "pq_out", split="val")
    assert list(read_pairs(tmp_path / "pq_out")["split"]) == ["val"]


@pytest.mark.parametrize("bad", ["../a.png", "/etc/passwd"])
def test_table_path_escaping_the_image_folder_is_named(tmp_path, bad):
    (tmp_path / "pics").mkdir()
    csv = tmp_path / "t.csv"
    pd.DataFrame({"image_path": ["ok.png", bad], "caption": ["x", "y"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="row 1"):
        import_table(csv, tmp_path / "pics", tmp_path / "out")


def test_image_folders_of_two_imports_are_both_linked(smoke_cfg, tmp_path):
    for name in ("one", "two"):
        (tmp_path / "x" / name).mkdir(parents=True)
        _image(tmp_path / "x" / name / "a.png", (1, 2, 3))
    (tmp_path / "y" / "one").mkdir(parents=True)
    _image(tmp_path / "y" / "one" / "a.png", (3, 2, 1))
    csv = tmp_path / "t.csv"
    pd.DataFrame({"image_path": ["a.png"], "caption": ["x y z"]}).to_csv(csv, index=False)
    out = tmp_path / "out"
    for folder in ("x/one", "x/two", "y/one"):
        import_table(csv, tmp_path / folder, out)
    links = {p.name: p.resolve() for p in (out / "images").iterdir()}
    assert links == {
        "one": tmp_path / "x" / "one",
        "two": tmp_path / "x" / "two",
        "one-2": tmp_path / "y" / "one",
    }
    pairs = read_pairs(out)
    assert list(pairs["image_path"]) == [
        "images/one/a.png",
        "images/two/a.png",
        "images/one-2/a.png",
    ]
    assert list(pairs["image_id"]) == list(pairs["caption_id"]) == [0, 1, 2]
    assert validate_dataset(out, smoke_cfg.validate)["success"]


def _coco_doc(image_id: object = 42, caption_id: object = 1) -> dict:
    return {
        "images": [{"id": 42, "file_name": _coco_name(42)}],
        "annotations": [{"id": caption_id, "image_id": image_id, "caption": "a red square"}],
    }


@pytest.mark.parametrize("bad", ["abc", None, "x0", 1.9, 3.0, True])
def test_coco_non_integer_ids_are_named(tmp_path, coco_images, bad):
    ann = _dump(tmp_path / "c.json", _coco_doc(caption_id=bad))
    with pytest.raises(
        DataError, match=rf"c\.json: annotations\[0\]: id {bad!r} is not an integer"
    ):
        import_coco(ann, coco_images, tmp_path / "out")
    ann = _dump(tmp_path / "c.json", _coco_doc(image_id=bad))
    with pytest.raises(DataError, match=rf"annotations\[0\]: image_id {bad!r} is not an integer"):
        import_coco(ann, coco_images, tmp_path / "out")
    assert not (tmp_path / "out" / "pairs.parquet").exists()


@pytest.mark.parametrize(
    ("cell", "shown"), [("x0", "'x0'"), ("1.9", "'1.9'"), ("3.0", "'3.0'"), ("", "is empty")]
)
def test_table_non_integer_ids_are_named(tmp_path, cell, shown):
    _image(tmp_path / "pics" / "a.png", (1, 2, 3))
    csv = tmp_path / "t.csv"
    csv.write_text(f"image_path,caption,caption_id\na.png,a thing,7\na.png,a thing,{cell}\n")
    with pytest.raises(DataError, match=rf"t\.csv: row 1: caption_id {shown}"):
        import_table(csv, tmp_path / "pics", tmp_path / "out")


def test_deeply_nested_annotations_are_named(tmp_path, coco_images):
    ann = tmp_path / "deep.json"
    ann.write_text("[" * 100_000 + "]" * 100_000)
    code = main(
        ["--params", str(REPO_PARAMS), "import", "coco", "--annotations", str(ann),
         "--images", str(coco_images), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2
    with pytest.raises(DataError, match=rf"{ann}: not valid JSON \(nested too deeply"):
        import_coco(ann, coco_images, tmp_path / "out")


def test_symlink_out_of_the_images_folder_is_named(tmp_path):
    images = tmp_path / "pics"
    _image(images / "a.png", (1, 2, 3))
    _image(tmp_path / "private" / "secret.png", (4, 5, 6))  # decodes fine: only the link is wrong
    (images / "b.png").symlink_to(tmp_path / "private" / "secret.png")
    csv = tmp_path / "t.csv"
    pd.DataFrame({"image_path": ["a.png", "b.png"], "caption": ["x y", "z w"]}).to_csv(
        csv, index=False
    )
    with pytest.raises(
        DataError, match=r"row 1: image_path 'images/pics/b.png' leads through a symlink"
    ):
        import_table(csv, images, tmp_path / "out")
    assert not (tmp_path / "out" / "images").exists()  # refused before anything was written
    # the declared folder itself is reached through the importer's own `OUT/images/pics` link
    csv.write_text("image_path,caption\na.png,x y\n")
    assert import_table(csv, images, tmp_path / "out")["rows"] == 1
    assert (tmp_path / "out" / "images" / "pics").is_symlink()


def test_import_replaces_its_own_manifest_but_no_other_file(tmp_path, capsys):
    out = tmp_path / "mine"
    _image(out / "pics" / "a.png", (1, 2, 3))
    (out / "notes.txt").write_text("keep me\n")
    (out / "pairs.parquet").write_text("my own file, not a manifest\n")
    table = tmp_path / "t.csv"
    pd.DataFrame({"image_path": ["a.png"], "caption": ["x y z"]}).to_csv(table, index=False)
    args = ["--params", str(REPO_PARAMS), "import", "table", "--table", str(table)]
    args += ["--images", str(out / "pics"), "--split", "train", "--out", str(out)]
    assert main(args) == 2
    assert str(out / "pairs.parquet") in capsys.readouterr().err
    assert (out / "pairs.parquet").read_text() == "my own file, not a manifest\n"

    (out / "pairs.parquet").unlink()
    assert main(args) == 0
    pd.DataFrame({"image_path": ["a.png"], "caption": ["new words"]}).to_csv(table, index=False)
    assert main(args) == 0  # a second import adds to the earlier manifest
    assert list(read_pairs(out)["caption"]) == ["x y z", "new words"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "pairs.parquet", "pics"]
    assert (out / "notes.txt").read_text() == "keep me\n"


def _coco_captions(path: Path, subtype: str, ids: list[int], first_caption_id: int) -> Path:
    name = lambda i: f"COCO_{subtype}_{i:012d}.jpg"  # noqa: E731
    return _dump(
        path,
        {
            "images": [{"id": i, "file_name": name(i)} for i in ids],
            "annotations": [
                {"id": first_caption_id + k, "image_id": i, "caption": f"picture {i}"}
                for k, i in enumerate(ids)
            ],
        },
    )


@pytest.fixture
def coco_train_val(tmp_path) -> tuple[Path, Path]:
    for subtype, ids in (("train2014", (1, 2)), ("val2014", (42, 73))):
        for i in ids:
            _image(tmp_path / "coco" / subtype / f"COCO_{subtype}_{i:012d}.jpg", (i, 0, 0))
    return tmp_path / "coco" / "train2014", tmp_path / "coco" / "val2014"


def test_imports_merge_and_reimports_change_nothing(smoke_cfg, tmp_path, coco_train_val):
    train, val = coco_train_val
    out = tmp_path / "out"
    train_ann = _coco_captions(tmp_path / "train.json", "train2014", [1, 2], 100)
    val_ann = _coco_captions(tmp_path / "val.json", "val2014", [42, 73], 200)
    assert import_coco(train_ann, train, out, split="train")["added"] == 2
    assert import_coco(val_ann, val, out, split="val")["added"] == 2
    pairs = read_pairs(out)
    assert list(pairs["image_id"]) == [1, 2, 42, 73]  # train2014 was not replaced by val2014
    assert list(pairs["split"]) == ["train", "train", "val", "val"]
    manifest = (out / "pairs.parquet").read_bytes()
    assert import_coco(val_ann, val, out, split="val")["added"] == 0  # idempotent
    assert (out / "pairs.parquet").read_bytes() == manifest
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train2014", "val2014"]
    assert validate_dataset(out, smoke_cfg.validate)["success"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # caption id 200 already names another caption of image 42
        (
            {
                "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
                "annotations": [{"id": 200, "image_id": 42, "caption": "another text"}],
            },
            r"caption_id 200 is already in .*pairs\.parquet with another caption "
            r"\('picture 42' vs 'another text'\)",
        ),
        # caption id 200 reused for another image
        (
            {
                "images": [{"id": 73, "file_name": "COCO_val2014_000000000073.jpg"}],
                "annotations": [{"id": 200, "image_id": 73, "caption": "picture 42"}],
            },
            r"caption_id 200 is already in .*with another image_id \(42 vs 73\)",
        ),
        # the same image under a second file name
        (
            {
                "images": [{"id": 42, "file_name": "COCO_val2014_000000000073.jpg"}],
                "annotations": [{"id": 300, "image_id": 42, "caption": "x"}],
            },
            r"image_id 42 would have two paths",
        ),
    ],
)
def test_conflicting_import_is_named_and_changes_nothing(tmp_path, coco_train_val, doc, message):
    _, val = coco_train_val
    out = tmp_path / "out"
    import_coco(_coco_captions(tmp_path / "val.json", "val2014", [42], 200), val, out, "val")
    before = (out / "pairs.parquet").read_bytes()
    with pytest.raises(DataError, match=message):
        import_coco(_dump(tmp_path / "bad.json", doc), val, out, split="val")
    assert (out / "pairs.parquet").read_bytes() == before


def test_an_image_in_a_second_split_is_refused_and_no_link_is_left(tmp_path, coco_train_val):
    train, val = coco_train_val
    out = tmp_path / "out"
    import_coco(_coco_captions(tmp_path / "val.json", "val2014", [42], 200), val, out, "test")
    table = tmp_path / "t.csv"
    # image 42 again, now from another folder and claimed for train
    table.write_text(
        "image_path,caption,image_id,split\nCOCO_train2014_000000000001.jpg,x,42,train\n"
    )
    before = (out / "pairs.parquet").read_bytes()
    with pytest.raises(DataError, match=r"image_id 42 would have two (paths|splits)"):
        import_table(table, train, out)
    assert (out / "pairs.parquet").read_bytes() == before
    assert [p.name for p in (out / "images").iterdir()] == ["val2014"]  # no new link


def test_vqa_questions_take_the_split_of_their_image(smoke_cfg, tmp_path, coco_train_val):
    """VQA v2 val2014 laid onto Karpathy splits in one command: val/test/restval images."""
    _, val = coco_train_val
    _image(val / "COCO_val2014_000000000099.jpg", (9, 9, 9))
    out = tmp_path / "out"
    karpathy = {
        "images": [
            {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
             "split": split, "sentences": [{"raw": f"image {i}", "sentid": i}]}
            for i, split in ((42, "test"), (73, "restval"))
        ]
    }  # fmt: skip
    import_karpathy(_dump(tmp_path / "k.json", karpathy), val.parent, out)
    qids = {42: 1, 73: 2, 99: 3}  # image 99 is not in the Karpathy file
    questions = _dump(
        tmp_path / "q.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": i, "question": "what is it?", "question_id": q}
                for i, q in qids.items()
            ],
        },
    )
    annotations = _dump(
        tmp_path / "a.json",
        {
            "annotations": [
                {"question_id": q, "image_id": i, "question_type": "what is",
                 "answer_type": "other", "multiple_choice_answer": "red",
                 "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1}
                             for k in range(10)]}
                for i, q in qids.items()
            ]
        },
    )  # fmt: skip
    summary = import_vqa(questions, annotations, val, out, split="val")
    assert summary["added"] == 3
    vqa = read_vqa(out).set_index("image_id")
    assert dict(vqa["split"]) == {42: "test", 73: "restval", 99: "val"}
    assert vqa.loc[42, "image_path"] == read_pairs(out).set_index("image_id").loc[42, "image_path"]
    assert vqa.loc[99, "image_path"] == "images/coco/val2014/COCO_val2014_000000000099.jpg"
    assert validate_dataset(out, smoke_cfg.validate)["success"]
    assert import_vqa(questions, annotations, val, out, split="val")["added"] == 0


def test_import_prints_the_settings_that_pretrain_on_the_dataset(tmp_path, capsys):
    import shlex

    from vlp.config import load_config

    out = tmp_path / "mine"
    for name in ("a", "b", "c"):
        _image(out / "pics" / f"{name}.png", (1, 2, 3))
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {
            "image_path": ["a.png", "b.png", "c.png"],
            "caption": ["x y z", "u v w", "p q r"],
            "split": ["train", "restval", "val"],
        }
    ).to_csv(table, index=False)
    args = ["--params", str(REPO_PARAMS), "import", "table", "--table", str(table)]
    assert main([*args, "--images", str(out / "pics"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (hint,) = [line for line in lines if "to pretrain on this dataset: " in line]
    words = shlex.split(hint.split("to pretrain on this dataset: ")[1])
    overrides = [w for prev, w in zip(words, words[1:], strict=False) if prev == "--set"]
    cfg = load_config(REPO_PARAMS, overrides=overrides)
    assert cfg.data.root == str(out)
    assert cfg.pretrain.splits == cfg.pretrain.tokenizer_splits == ["train", "restval"]
    assert cfg.pretrain.caption_warmup_steps == 0


def test_linking_an_outside_folder_says_dvc_will_not_version_its_images(tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame({"image_path": ["a.png"], "caption": ["x y z"]}).to_csv(table, index=False)
    base = ["--params", str(REPO_PARAMS), "import", "table", "--table", str(table)]
    inside = tmp_path / "inside"
    _image(inside / "images" / "pics" / "a.png", (1, 2, 3))
    assert main([*base, "--images", str(inside / "images" / "pics"), "--out", str(inside)]) == 0
    assert "note:" not in capsys.readouterr().out

    outside = tmp_path / "outside"
    _image(outside / "pics" / "a.png", (1, 2, 3))
    assert main([*base, "--images", str(outside / "pics"), "--out", str(outside / "ds")]) == 0
    printed = capsys.readouterr().out
    assert f"`dvc add {outside / 'ds'}` does not version images behind a link" in printed
    assert f"move the folder into {outside / 'ds' / 'images'}/" in printed


def _import_cli(*args: str) -> int:
    return main(["--params", str(REPO_PARAMS), "import", *args])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("inside", ["", "images/mine"])
def test_import_into_a_folder_vlp_generated_is_refused(smoke_data, tmp_path, capsys, inside):
    generated = tmp_path / "shapes"
    shutil.copytree(smoke_data, generated)
    _image(generated / "images" / "mine" / "a.png", (1, 2, 3))
    before = _tree(generated)
    table = tmp_path / "t.csv"
    table.write_text("image_path,caption\na.png,my photo\n")
    out = generated / inside if inside else generated
    args = ["table", "--table", str(table), "--images", str(generated / "images" / "mine")]
    assert _import_cli(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{generated} is a folder vlp writes" in err and "import into another folder" in err
    assert _tree(generated) == before


def _vqa_docs(tmp_path: Path, question: dict | None = None, ann: dict | None = None) -> list[str]:
    q = {"image_id": 42, "question": "Is it red?", "question_id": 1, **(question or {})}
    a = {
        "question_id": 1,
        "image_id": 42,
        "question_type": "is it",
        "answer_type": "yes/no",
        "multiple_choice_answer": "yes",
        "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
        **(ann or {}),
    }
    qs = _dump(tmp_path / "q.json", {"questions": [q]})
    an = _dump(tmp_path / "a.json", {"annotations": [a]})
    return ["vqa", "--questions", str(qs), "--annotations", str(an)]


def _karpathy(tmp_path: Path, image: object) -> list[str]:
    return ["karpathy", "--split-json", str(_dump(tmp_path / "k.json", {"images": [image]}))]


def _karpathy_image(**changes: object) -> dict:
    sentence = {"raw": "A red square.", "sentid": 10}
    image = {"filename": _coco_name(42), "cocoid": 42, "split": "test", "sentences": [sentence]}
    return {**image, **changes}


BIG = 2**63
BAD_INPUTS = {
    "coco caption id >= 2^63": (
        lambda t: ["coco", "--annotations", str(_dump(t / "c.json", _coco_doc(caption_id=BIG)))],
        rf"c\.json: annotations\[0\]: id {BIG} does not fit in 64 bits",
    ),
    "coco image id >= 2^63": (
        lambda t: ["coco", "--annotations", str(_dump(t / "c.json", _coco_doc(image_id=BIG)))],
        rf"annotations\[0\]: image_id {BIG} does not fit in 64 bits",
    ),
    "vqa question id >= 2^63": (
        lambda t: _vqa_docs(t, {"question_id": BIG}),
        rf"q\.json: questions\[0\]: question_id {BIG} does not fit",
    ),
    "karpathy cocoid >= 2^63": (
        lambda t: _karpathy(t, _karpathy_image(cocoid=BIG)),
        rf"k\.json: images\[0\]: cocoid {BIG} does not fit",
    ),
    "karpathy sentid >= 2^63": (
        lambda t: _karpathy(t, _karpathy_image(sentences=[{"raw": "x", "sentid": BIG}])),
        rf"images\[0\]\.sentences\[0\]: sentid {BIG} does not fit",
    ),
    "karpathy image not an object": (
        lambda t: _karpathy(t, 5),
        r"k\.json: images\[0\]: expected an object, got 5",
    ),
    "karpathy sentences not a list": (
        lambda t: _karpathy(t, _karpathy_image(sentences=5)),
        r"k\.json: images\[0\]: 'sentences' must be a list",
    ),
    "karpathy sentence not an object": (
        lambda t: _karpathy(t, _karpathy_image(sentences=[5])),
        r"images\[0\]\.sentences\[0\]: expected an object, got 5",
    ),
    "vqa answers not a list": (
        lambda t: _vqa_docs(t, ann={"answers": 5}),
        r"a\.json: annotations\[0\]: answers 5 must be a list",
    ),
    "coco caption null": (
        lambda t: ["coco", "--annotations", str(_dump(t / "c.json", _caption_doc(None)))],
        r"c\.json: annotations\[0\]: caption None is not text",
    ),
    "coco caption an object": (
        lambda t: ["coco", "--annotations", str(_dump(t / "c.json", _caption_doc({"a": 1})))],
        r"c\.json: annotations\[0\]: caption \{'a': 1\} is not text",
    ),
    "coco caption a number": (
        lambda t: ["coco", "--annotations", str(_dump(t / "c.json", _caption_doc(5)))],
        r"c\.json: annotations\[0\]: caption 5 is not text",
    ),
    "coco file_name null": (
        lambda t: [
            "coco",
            "--annotations",
            str(_dump(t / "c.json", {**_coco_doc(), "images": [{"id": 42, "file_name": None}]})),
        ],
        r"c\.json: images\[0\]: file_name None is not text",
    ),
    "karpathy raw null": (
        lambda t: _karpathy(t, _karpathy_image(sentences=[{"raw": None, "sentid": 1}])),
        r"images\[0\]\.sentences\[0\]: raw None is not text",
    ),
    "vqa question a number": (
        lambda t: _vqa_docs(t, {"question": 7}),
        r"q\.json: questions\[0\]: question 7 is not text",
    ),
}


def _caption_doc(caption: object) -> dict:
    doc = _coco_doc()
    doc["annotations"][0]["caption"] = caption
    return doc


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_malformed_records_are_named_and_nothing_is_written(tmp_path, coco_images, capsys, case):
    args, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    assert _import_cli(*args(tmp_path), "--images", str(coco_images), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_table_ids_beyond_64_bits_and_captions_not_text_are_named(tmp_path):
    _image(tmp_path / "pics" / "a.png", (1, 2, 3))
    csv = tmp_path / "t.csv"
    csv.write_text(f"image_path,caption,image_id\na.png,a thing,{BIG}\n")
    with pytest.raises(DataError, match=rf"t\.csv: row 0: image_id {BIG} does not fit"):
        import_table(csv, tmp_path / "pics", tmp_path / "out")
    table = tmp_path / "t.parquet"
    pd.DataFrame({"image_path": ["a.png"], "caption": [5]}).to_parquet(table)
    with pytest.raises(DataError, match=r"t\.parquet: row 0: caption 5 is not text"):
        import_table(table, tmp_path / "pics", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vqa_with_a_missing_image_folder_is_named(tmp_path, capsys):
    q = _vqa_docs(tmp_path)
    missing = tmp_path / "nowhere"
    assert _import_cli(*q, "--images", str(missing), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{missing}: image folder not found" in err


def test_an_unwritable_out_is_named_before_reading_images(tmp_path, coco_images, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    ann = _dump(tmp_path / "c.json", _coco_doc())
    out = blocker / "out"
    assert _import_cli("coco", "--annotations", str(ann), "--images", str(coco_images),
                       "--out", str(out)) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {out}: cannot write in {blocker}" in err


def test_one_image_file_under_a_new_id_in_another_split_is_refused(tmp_path, coco_train_val):
    _, val = coco_train_val
    out = tmp_path / "out"
    import_coco(_coco_captions(tmp_path / "val.json", "val2014", [42], 200), val, out, "test")
    before = (out / "pairs.parquet").read_bytes()
    table = tmp_path / "t.csv"
    table.write_text(
        "image_path,caption,image_id,split\nCOCO_val2014_000000000042.jpg,x,99,train\n"
    )
    path = "images/val2014/COCO_val2014_000000000042.jpg"
    with pytest.raises(
        DataError,
        match=rf"t\.csv: image file '{path}' would be in two splits: "
        r"image_id 42 \(test\) and image_id 99 \(train\)",
    ):
        import_table(table, val, out)
    assert (out / "pairs.parquet").read_bytes() == before


def _karpathy_coco(path: Path, captions: dict[int, list[str]], first_sentid: int = 0) -> Path:
    """A Karpathy dataset_coco.json of val2014 images (filepath val2014), test split."""
    images, sentid = [], first_sentid
    for cocoid, texts in captions.items():
        sentences = [{"raw": t, "sentid": sentid + k} for k, t in enumerate(texts)]
        sentid += len(texts)
        images.append(
            {
                "filepath": "val2014",
                "filename": _coco_name(cocoid),
                "cocoid": cocoid,
                "split": "test",
                "sentences": sentences,
            }
        )
    return _dump(path, {"images": images})


def test_karpathy_then_coco_captions_of_the_same_images_do_not_double(
    smoke_cfg, tmp_path, coco_images
):
    captions = {42: ["A red square.", "Red."], 73: ["Blue thing"]}
    out = tmp_path / "out"
    import_karpathy(_karpathy_coco(tmp_path / "k.json", captions), coco_images.parent, out)
    coco = {
        "images": [{"id": i, "file_name": _coco_name(i)} for i in captions],
        "annotations": [  # COCO's ids, not Karpathy's sentids; one more caption; raw spacing
            {"id": 500, "image_id": 42, "caption": "A red  square. "},
            {"id": 501, "image_id": 42, "caption": "Red."},
            {"id": 502, "image_id": 73, "caption": "Blue thing"},
            {"id": 503, "image_id": 73, "caption": "A blue square."},
        ],
    }
    summary = import_coco(_dump(tmp_path / "c.json", coco), coco_images, out, split="val")
    assert (summary["added"], summary["merged"]) == (1, 3)
    pairs = read_pairs(out)
    assert list(pairs["caption_id"]) == [0, 1, 2, 503]  # Karpathy's rows, then the new one
    assert not pairs.duplicated(["image_id", "caption"]).any()
    assert set(pairs["split"]) == {"test"}  # splits belong to images
    assert validate_dataset(out, smoke_cfg.validate)["success"]


def test_karpathy_filepath_under_the_wrong_folder_says_what_to_pass(tmp_path, coco_images):
    split_json = _karpathy_coco(tmp_path / "k.json", {42: ["A red square."]})
    # the images folder itself, not the one holding Karpathy's filepath (val2014/)
    with pytest.raises(DataError, match=rf"pass --images {re.escape(str(coco_images.parent))}$"):
        import_karpathy(split_json, coco_images, tmp_path / "out")
    assert not (tmp_path / "out" / "pairs.parquet").exists()


def test_karpathy_after_coco_from_another_folder_says_what_to_pass(tmp_path, coco_images, capsys):
    out = tmp_path / "out"
    coco = {
        "images": [{"id": 42, "file_name": _coco_name(42)}],
        "annotations": [{"id": 500, "image_id": 42, "caption": "A red square."}],
    }
    import_coco(_dump(tmp_path / "c.json", coco), coco_images, out, split="test")
    before = (out / "pairs.parquet").read_bytes()
    # a copy of the tree elsewhere: Karpathy's path would name the image a second time
    other = shutil.copytree(coco_images.parent, tmp_path / "elsewhere" / "coco")
    split_json = _karpathy_coco(tmp_path / "k.json", {42: ["Red."]})
    with pytest.raises(DataError) as e:
        import_karpathy(split_json, other, out)
    assert "image_id 42 is already in" in str(e.value)
    # the folder of OUT whose val2014/ is the image: OUT/images, where COCO's folder is linked
    assert str(e.value).endswith(f"pass --images {out / 'images'}")
    assert (out / "pairs.parquet").read_bytes() == before
    import_karpathy(split_json, out / "images", out)  # as the message says
    assert len(read_pairs(out)) == 2
