"""Manifest schema, IO and the image-path guard."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from vlp.data.manifest import read_pairs, read_vqa, resolve_image, write_manifest
from vlp.errors import DataError


def _pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "caption_id": [1, 2, 3],
            "image_id": [10, 10, 11],
            "image_path": ["images/a.png", "images/a.png", "images/b.png"],
            "caption": ["a cat", "the cat", "a dog"],
            "split": ["train", "train", "test"],
            "extra": [0, 0, 0],
        }
    )


def test_pairs_round_trip_with_schema_and_split_filter(tmp_path):
    write_manifest(_pairs(), tmp_path / "pairs.parquet")
    df = read_pairs(tmp_path)
    assert list(df.columns) == ["caption_id", "image_id", "image_path", "caption", "split"]
    assert str(df["caption_id"].dtype) == "int64"
    assert list(read_pairs(tmp_path, "test")["caption"]) == ["a dog"]
    assert len(read_pairs(tmp_path, ["train", "test"])) == 3


def test_vqa_answers_come_back_as_lists(tmp_path):
    df = pd.DataFrame(
        {
            "question_id": [5],
            "image_id": [10],
            "image_path": ["images/a.png"],
            "question": ["how many cats?"],
            "question_type": ["how many"],
            "answers": [["1"] * 9 + ["one"]],
            "answer_type": ["number"],
            "multiple_choice_answer": ["1"],
            "split": ["val"],
        }
    )
    write_manifest(df, tmp_path / "vqa.parquet")
    back = read_vqa(tmp_path)
    assert back.loc[0, "answers"] == ["1"] * 9 + ["one"]


def test_bad_manifest_is_rejected_and_old_file_kept(tmp_path):
    write_manifest(_pairs(), tmp_path / "pairs.parquet")
    before = (tmp_path / "pairs.parquet").read_bytes()
    with pytest.raises(DataError, match="caption"):
        write_manifest(_pairs().drop(columns=["caption"]), tmp_path / "pairs.parquet")
    assert (tmp_path / "pairs.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_missing_manifest_or_column_names_the_file(tmp_path):
    with pytest.raises(DataError, match="pairs.parquet"):
        read_pairs(tmp_path)
    _pairs().drop(columns=["split"]).to_parquet(tmp_path / "pairs.parquet")
    with pytest.raises(DataError, match="split"):
        read_pairs(tmp_path)


@pytest.mark.parametrize("rel", ["images/a.png", "images/./a.png", "images/x/../a.png"])
def test_resolve_image_accepts_paths_inside(tmp_path, rel):
    assert resolve_image(tmp_path, rel) == tmp_path / "images" / "a.png"


@pytest.mark.parametrize("rel", ["../x.png", "images/../../x.png", "/etc/passwd", "", "a\\b.png"])
def test_resolve_image_rejects_escapes(tmp_path, rel):
    with pytest.raises(DataError):
        resolve_image(Path(tmp_path), rel)
