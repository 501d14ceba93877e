"""The shapes generator: determinism, split hygiene, correct captions and answers."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlp.data.manifest import read_pairs, read_vqa
from vlp.data.shapes import (
    ShapeObject,
    ShapesScene,
    canonical_caption,
    generate_dataset,
    render_scene,
    scene_captions,
    scene_questions,
)
from vlp.errors import DataError
from vlp.io import OUTPUT_MARKER


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _official_accuracy(truth: str, answers: list[str]) -> float:
    """VQA v2: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        scores.append(min(1.0, sum(a == truth for a in others) / 3))
    return sum(scores) / len(scores)


SCENE = ShapesScene(
    objects=(
        ShapeObject(0, 0, "large", "red", "circle"),
        ShapeObject(1, 1, "small", "blue", "square"),
    ),
    jitter=((0.0, 0.0), (0.0, 0.0)),
)


def test_same_seed_gives_byte_identical_files(smoke_cfg, smoke_data, tmp_path):
    again = generate_dataset(smoke_cfg.data, tmp_path / "again")
    assert _digest(again) == _digest(smoke_data)
    other = generate_dataset(dataclasses.replace(smoke_cfg.data, seed=1), tmp_path / "other")
    assert _digest(other) != _digest(smoke_data)


def test_split_sizes_and_no_image_in_two_splits(smoke_cfg, smoke_data):
    pairs = read_pairs(smoke_data)
    d = smoke_cfg.data
    per_split = pairs.groupby("split")["image_id"].nunique().to_dict()
    assert per_split == {
        "pretrain": d.n_pretrain,
        "train": d.n_train,
        "val": d.n_val,
        "test": d.n_test,
    }
    assert (pairs.groupby("image_id")["split"].nunique() == 1).all()
    assert (pairs.groupby("image_id").size() == d.captions_per_image).all()
    assert pairs["caption_id"].is_unique
    for rel in pairs["image_path"].unique():
        with Image.open(smoke_data / rel) as img:
            assert img.size == (d.image_size, d.image_size)


def test_scenes_unique_and_eval_captions_unambiguous(smoke_data):
    pairs = read_pairs(smoke_data)
    canonical = pairs.groupby("image_id")["caption"].first()
    assert canonical.is_unique  # no scene occurs twice: test never copies train
    for split in ("val", "test"):
        caps = pairs[pairs["split"] == split]["caption"]
        assert caps.is_unique, f"a {split} caption describes two images"


def test_vqa_layout_and_ground_truth_scores_one(smoke_cfg, smoke_data):
    vqa = read_vqa(smoke_data)
    pairs = read_pairs(smoke_data)
    downstream = pairs[pairs["split"] != "pretrain"]["image_id"].nunique()
    assert len(vqa) == downstream * smoke_cfg.data.questions_per_image
    assert set(vqa["split"]) == {"train", "val", "test"}
    assert vqa["question_id"].is_unique
    assert set(vqa["answer_type"]) == {"yes/no", "number", "other"}
    assert all(len(a) == 10 for a in vqa["answers"])
    acc = [
        _official_accuracy(t, a)
        for t, a in zip(vqa["multiple_choice_answer"], vqa["answers"], strict=True)
    ]
    assert min(acc) == 1.0
    # annotators disagree sometimes, like real VQA v2 annotators
    assert any(len(set(a)) > 1 for a in vqa["answers"])


def test_canonical_caption_and_variants_describe_the_scene():
    assert canonical_caption(SCENE) == (
        "a large red circle at the top left and a small blue square in the center"
    )
    caps = scene_captions(SCENE, random.Random(0), 5)
    assert len(set(caps)) == 5
    assert all("red" in c and "blue" in c for c in caps)


def test_questions_have_the_right_answers():
    truth = {
        "how many shapes are there?": "2",
        "how many circles are there?": "1",
        "how many triangles are there?": "0",
        "is there a red circle?": "yes",
        "is there a blue circle?": "no",
        "what color is the square?": "blue",
        "what color is the circle?": "red",
        "what shape is the red object?": "circle",
        "what size is the blue square?": "small",
        "where is the square?": "center",
        "where is the circle?": "top left",
        "is the circle to the left of the square?": "yes",
        "is the square to the left of the circle?": "no",
        "what shape is to the left of the square?": "circle",
    }
    asked = {}
    for seed in range(300):
        for q, _, answer, _ in scene_questions(SCENE, random.Random(seed), 6):
            asked[q] = answer
    checked = {q: asked[q] for q in truth if q in asked}
    assert len(checked) >= 10
    assert checked == {q: truth[q] for q in checked}


@pytest.mark.parametrize("size", [32, 64])
def test_render_puts_colours_in_their_cells(size):
    img = render_scene(SCENE, size).convert("RGB")
    cell = size / 3
    red = img.getpixel((int(cell / 2), int(cell / 2)))
    blue = img.getpixel((int(1.5 * cell), int(1.5 * cell)))
    empty = img.getpixel((int(2.5 * cell), int(2.5 * cell)))
    assert red[0] > 200 and red[2] < 60
    assert blue[2] > 200 and blue[0] < 60
    assert empty == (0, 0, 0)


def test_impossible_sizes_are_rejected(smoke_cfg, tmp_path):
    with pytest.raises(DataError, match="image_size"):
        generate_dataset(dataclasses.replace(smoke_cfg.data, image_size=8), tmp_path / "x")


def _generate_cli(out: Path) -> int:
    from vlp.cli import main

    repo = Path(__file__).resolve().parents[2]
    return main(
        ["--params", str(repo / "params.yaml"), "--profile", "smoke", "generate", "--out", str(out)]
    )


def test_generate_refuses_a_foreign_folder_and_keeps_every_file(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "important.txt").write_text("keep me\n")
    (out / "notes" / "todo.md").write_text("mine\n")
    assert _generate_cli(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and OUTPUT_MARKER in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "important.txt",
        "notes",
        "notes/todo.md",
    ]
    assert (out / "important.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dirs left


def test_generate_replaces_its_own_output(smoke_cfg, smoke_data, tmp_path):
    out = tmp_path / "shapes"
    older = dataclasses.replace(smoke_cfg.data, n_test=smoke_cfg.data.n_test + 3)
    generate_dataset(older, out)  # an older run's images, more than this one writes
    assert _generate_cli(out) == 0
    assert _digest(out) == _digest(smoke_data)
    # DVC hashes the marker with the data: its bytes are those of every earlier version
    marker = "vlp output: dataset\nvlp may delete and rewrite this directory.\n"
    assert (out / OUTPUT_MARKER).read_text() == marker


@pytest.mark.parametrize("added", ["images/mine/photo.jpg", "photo.jpg", "pairs.csv"])
def test_generate_keeps_a_dataset_that_gained_files_it_did_not_write(
    smoke_data, tmp_path, capsys, added
):
    out = tmp_path / "shapes"
    assert _generate_cli(out) == 0
    (out / added).parent.mkdir(parents=True, exist_ok=True)
    (out / added).write_bytes(b"the user's only copy")
    before = _digest(out)
    assert _generate_cli(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"holds {added}, which vlp did not write" in err
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temp dirs left


def test_generate_names_an_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    assert _generate_cli(blocker / "shapes") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write in {blocker}" in err


def test_one_object_scenes_are_labelled_by_their_object():
    from vlp.data.shapes import ShapeObject, ShapesScene, canonical_caption, single_object_labels

    one = ShapesScene((ShapeObject(0, 2, "small", "purple", "cross"),), ((0.0, 0.0),))
    two = ShapesScene(
        (ShapeObject(0, 0, "large", "red", "circle"), ShapeObject(1, 1, "small", "blue", "square")),
        ((0.0, 0.0), (0.0, 0.0)),
    )
    pairs = pd.DataFrame(
        {
            "caption_id": [11, 10, 20, 30],
            "image_id": [1, 1, 2, 3],
            "image_path": ["a.png", "a.png", "b.png", "c.png"],
            "caption": ["a purple cross", canonical_caption(one), canonical_caption(two), "a dog"],
            "split": ["test"] * 4,
        }
    )
    labels = single_object_labels(pairs)
    assert labels.to_dict("records") == [
        {"image_id": 1, "image_path": "a.png", "shape": "cross", "color": "purple", "size": "small"}
    ]
