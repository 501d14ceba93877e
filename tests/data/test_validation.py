"""`vlp validate`: each kind of broken dataset fails naming the bad row or file."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest

from vlp.cli import main
from vlp.data.manifest import read_pairs, read_vqa, write_manifest
from vlp.data.validation import DATASETS_REPORT_DIR, validate_dataset, validate_stage
from vlp.errors import DataError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def data(smoke_data, tmp_path) -> Path:
    """A private copy of the smoke dataset that a test may break."""
    return shutil.copytree(smoke_data, tmp_path / "shapes")


def _failures(data: Path, smoke_cfg) -> str:
    summary = validate_dataset(data, smoke_cfg.validate)
    assert not summary["success"]
    return "\n".join(summary["failures"])


def _edit_pairs(data: Path, edit) -> pd.DataFrame:
    df = read_pairs(data)
    edit(df)
    df.to_parquet(data / "pairs.parquet", index=False)  # raw write: no schema coercion
    return df


def _train_path(data: Path) -> str:
    pairs = read_pairs(data, "train")
    return pairs["image_path"].iloc[3]


def test_valid_dataset_passes(smoke_cfg, smoke_data):
    summary = validate_dataset(smoke_data, smoke_cfg.validate)
    assert summary["success"], summary["failures"]
    assert summary["manifests"]["pairs.parquet"]["images"] == 88
    assert summary["expectations"] > 30


def test_corrupt_png_is_named(smoke_cfg, data):
    rel = _train_path(data)
    (data / rel).write_bytes((data / rel).read_bytes()[:40])  # truncated PNG
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_be_null(image_problem)" in report
    assert f"{rel}: cannot decode image" in report


def test_missing_image_is_named(smoke_cfg, data):
    rel = _train_path(data)
    (data / rel).unlink()
    assert f"{rel}: file not found" in _failures(data, smoke_cfg)


def test_empty_caption_is_named(smoke_cfg, data):
    df = _edit_pairs(
        data, lambda df: df.__setitem__("caption", df["caption"].mask(df.index == 7, ""))
    )
    report = _failures(data, smoke_cfg)
    assert "expect_column_value_lengths_to_be_between(caption)" in report
    assert f"caption_id={int(df.loc[7, 'caption_id'])}" in report


def test_duplicate_ids_are_named(smoke_cfg, data):
    def dup(df):
        df.loc[5, "caption_id"] = df.loc[4, "caption_id"]

    df = _edit_pairs(data, dup)
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_be_unique(caption_id)" in report
    assert f"caption_id={int(df.loc[4, 'caption_id'])}" in report


def test_one_pair_in_two_rows_is_named(smoke_cfg, data):
    def twice(df):  # caption 5 repeats caption 4 of the same image under its own id
        df.loc[5, ["image_id", "image_path", "split", "caption"]] = df.loc[
            4, ["image_id", "image_path", "split", "caption"]
        ]

    df = _edit_pairs(data, twice)
    report = _failures(data, smoke_cfg)
    assert "expect_compound_columns_to_be_unique" in report
    assert f"caption_id={int(df.loc[5, 'caption_id'])}" in report
    assert "expect_column_values_to_be_unique(caption_id)" not in report


@pytest.mark.parametrize("bad", ["../x.png", "images/../../x.png", "/etc/hostname"])
def test_path_escaping_the_root_is_named(smoke_cfg, data, bad):
    _edit_pairs(
        data, lambda df: df.__setitem__("image_path", df["image_path"].mask(df.index == 2, bad))
    )
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_not_match_regex_list(image_path)" in report
    assert repr(bad) in report


def test_test_image_leaked_into_train_is_named(smoke_cfg, data):
    def leak(df):
        row = df[df["split"] == "test"].iloc[[0]].copy()
        row["split"] = "train"
        row["caption_id"] = df["caption_id"].max() + 1
        df.loc[len(df)] = row.iloc[0]

    df = _edit_pairs(data, leak)
    leaked = df.iloc[-1]["image_path"]
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_be_between(n_splits_of_image)" in report
    assert f"image_path={leaked!r}" in report and "image in splits test,train" in report


def test_vqa_row_with_nine_answers_is_named(smoke_cfg, data):
    vqa = read_vqa(data)
    vqa.at[3, "answers"] = vqa.at[3, "answers"][:9]
    write_manifest(vqa, data / "vqa.parquet")
    report = _failures(data, smoke_cfg)
    assert "vqa.parquet: expect_column_values_to_be_between(n_answers)" in report
    assert f"question_id={int(vqa.loc[3, 'question_id'])}" in report and "9 answers" in report


def test_stage_writes_summary_and_docs_outside_the_data(smoke_cfg, smoke_data):
    before = sorted(p.name for p in smoke_data.iterdir())
    summary = validate_stage(smoke_cfg, None)
    report_dir = Path(smoke_cfg.validate.report_dir)
    assert json.loads((report_dir / "summary.json").read_text())["success"] is True
    assert summary["success"]
    assert (report_dir / "data_docs" / "index.html").exists()
    assert sorted(p.name for p in smoke_data.iterdir()) == before


def test_cli_failure_exits_nonzero_and_writes_docs_to_the_report_dir_not_the_data(
    data, tmp_path, capsys
):
    rel = _train_path(data)
    (data / rel).unlink()
    before = _tree(data)
    reports = tmp_path / "reports"
    code = main(
        ["--params", str(REPO_PARAMS), "--profile", "smoke",
         "--set", f"validate.report_dir={reports}", "validate", "--data", str(data)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "expectations failed" in err and rel in err
    docs = reports / DATASETS_REPORT_DIR / data.name
    assert (docs / "index.html").exists() and f"report: {docs / 'index.html'}" in err
    assert json.loads((docs / "summary.json").read_text())["success"] is False
    assert _tree(data) == before  # the dataset is read, never written


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_missing_dataset_dir_is_a_data_error(smoke_cfg, tmp_path):
    with pytest.raises(DataError, match="not found"):
        validate_stage(smoke_cfg, tmp_path / "nope")


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20_000, 5_000])  # past PIL's own bomb limit, and under it
def test_decompression_bomb_png_is_named_not_decoded(smoke_cfg, data, side):
    rel = _train_path(data)
    _png_header(data / rel, side, side)
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_be_null(image_problem)" in report
    assert f"image_path={rel!r}" in report and "caption_id=" in report
    assert f"{rel}: image too large to open" in report or f"{rel}: size {side}x{side}" in report


def test_symlink_to_a_file_outside_the_dataset_is_named(smoke_cfg, data, tmp_path):
    rel = _train_path(data)
    outside = tmp_path / "outside.png"
    shutil.copy(data / rel, outside)  # a good image: only its location is wrong
    (data / rel).unlink()
    (data / rel).symlink_to(outside)
    report = _failures(data, smoke_cfg)
    assert "expect_column_values_to_be_null(image_problem)" in report
    assert f"image_path={rel!r}" in report and f"leads through a symlink to {outside}" in report


def _validate_cli(*args: str) -> int:
    return main(["--params", str(REPO_PARAMS), "--profile", "smoke", *args])


def test_unwritable_report_still_shows_the_failures(data, tmp_path, capsys):
    rel = _train_path(data)
    (data / rel).unlink()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the report folder should go\n")
    code = _validate_cli(
        "--set", f"data.root={data}", "--set", f"validate.report_dir={blocker}/validation",
        "validate",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "expectations failed" in err and f"{rel}: file not found" in err
    assert f"report: cannot write the report to {blocker}/validation" in err


def test_unwritable_report_of_valid_data_is_one_line(smoke_data, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code = _validate_cli(
        "--set", f"data.root={smoke_data}", "--set", f"validate.report_dir={blocker}/validation",
        "validate",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "expectations passed" in captured.out
    assert f"cannot write the report to {blocker}/validation" in captured.err
    assert captured.err.count("\n") == 1
