"""`vlp embed`: one Parquet row per image and caption, equal to the checkpoint's own features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

from tests.checkpoints.clip import write_tiny_clip
from tests.checkpoints.vlp import tiny_vlp_dir
from vlp.cli import main
from vlp.config import Config
from vlp.data.manifest import read_pairs

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def _embed(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        ["--params", PARAMS, "--profile", "smoke", "--set", "runtime.device=cpu"]
        + ["embed", "--model", str(model), "--data", str(data), "--out", str(out), *extra]
    )


def _images(data: Path, paths: list[str]) -> list:
    from PIL import Image

    return [Image.open(data / p).convert("RGB") for p in paths]


def _rows(out: Path) -> tuple[dict, dict]:
    """(image_id -> embedding, caption_id -> embedding) of an embeddings file."""
    df = pq.read_table(out).to_pandas()
    images = df[df["kind"] == "image"]
    texts = df[df["kind"] == "text"]
    return (
        {
            int(i): np.asarray(e)
            for i, e in zip(images["image_id"], images["embedding"], strict=True)
        },
        {
            int(i): np.asarray(e)
            for i, e in zip(texts["caption_id"], texts["embedding"], strict=True)
        },
    )


def test_vlp_dir_embeddings_equal_the_models_own_features(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path
) -> None:
    from vlp.data.images import ImageTransform
    from vlp.models.vlp_model import VLPModel

    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    out = tmp_path / "emb.parquet"
    assert (
        _embed(
            model_dir,
            smoke_data,
            out,
            "--split",
            "test",
            "--batch-size",
            "3",
            "--precision",
            "fp32",
        )
        == 0
    )

    table = pq.read_table(out)
    assert table.schema.field("embedding").type.value_type == "float"
    df = table.to_pandas()
    pairs = read_pairs(smoke_data, "test")
    images = pairs.drop_duplicates("image_id")
    assert (df["kind"] == "image").sum() == len(images)
    assert (df["kind"] == "text").sum() == len(pairs)
    assert df.loc[df["kind"] == "image", "caption_id"].isna().all()
    assert df.loc[df["kind"] == "image", "text"].isna().all()
    texts = df[df["kind"] == "text"]
    assert list(texts["text"]) == list(pairs["caption"])

    model = VLPModel.from_pretrained(model_dir).eval()
    transform = ImageTransform(32, "squash", (0.5,) * 3, (0.5,) * 3)
    by_image, by_caption = _rows(out)
    with torch.no_grad():
        pixels = transform.pixels(_images(smoke_data, list(images["image_path"])))
        want_img = model.encode_image(pixels)[1]
        for caption_id, caption in zip(pairs["caption_id"], pairs["caption"], strict=True):
            enc = model.tokenize([caption])  # alone: no padding at all
            want = model.encode_text(enc["input_ids"], enc["attention_mask"])[1][0]
            np.testing.assert_allclose(by_caption[int(caption_id)], want.numpy(), atol=1e-5)
    for row, image_id in enumerate(images["image_id"]):
        np.testing.assert_allclose(by_image[int(image_id)], want_img[row].numpy(), atol=1e-5)


def test_clip_dir_embeddings_equal_get_image_and_text_features(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path
) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip_dir = write_tiny_clip(tmp_path / "clip")
    out = tmp_path / "emb.parquet"
    # no --precision: zeroshot.precision auto is fp32 on CPU, the checkpoint's own outputs
    assert _embed(clip_dir, smoke_data, out, "--split", "test") == 0
    assert pq.read_schema(out).metadata[b"vlp.precision"] == b"fp32"
    by_image, by_caption = _rows(out)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = AutoImageProcessor.from_pretrained(clip_dir)
    pairs = read_pairs(smoke_data, "test")
    images = pairs.drop_duplicates("image_id")
    with torch.no_grad():
        pixels = proc(images=_images(smoke_data, list(images["image_path"])), return_tensors="pt")
        img = F.normalize(model.get_image_features(**pixels).pooler_output, dim=-1)
        enc = tok(
            list(pairs["caption"]),
            padding=True,
            truncation=True,
            max_length=model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        txt = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
    for row, image_id in enumerate(images["image_id"]):
        np.testing.assert_allclose(by_image[int(image_id)], img[row].numpy(), atol=1e-5)
    for row, caption_id in enumerate(pairs["caption_id"]):
        np.testing.assert_allclose(by_caption[int(caption_id)], txt[row].numpy(), atol=1e-5)


def test_bf16_embeddings_are_normalised_and_close_to_fp32(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path
) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    fp32, bf16 = tmp_path / "fp32.parquet", tmp_path / "bf16.parquet"
    assert _embed(model_dir, smoke_data, fp32, "--split", "val", "--precision", "fp32") == 0
    assert _embed(model_dir, smoke_data, bf16, "--split", "val", "--precision", "bf16") == 0
    assert pq.read_schema(bf16).metadata[b"vlp.precision"] == b"bf16"
    a = np.stack(pq.read_table(fp32).to_pandas()["embedding"])
    b = np.stack(pq.read_table(bf16).to_pandas()["embedding"])
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(a, b)  # bf16 did run
    assert (a * b).sum(axis=1).min() > 0.98


def test_out_path_rules(smoke_cfg: Config, smoke_data: Path, tmp_path: Path, capsys) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    foreign = tmp_path / "notes.parquet"
    foreign.write_text("mine")
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    for bad, why in (
        (foreign, "not written by `vlp embed`"),
        (folder, "is a directory"),
        (tmp_path / "missing" / "e.parquet", "does not exist"),
    ):
        assert _embed(model_dir, smoke_data, bad, "--split", "test") == 2
        assert why in capsys.readouterr().err
    assert foreign.read_text() == "mine" and folder.is_dir() and not any(folder.iterdir())

    own = tmp_path / "e.parquet"
    assert _embed(model_dir, smoke_data, own, "--split", "test") == 0
    assert _embed(model_dir, smoke_data, own, "--split", "val") == 0  # its own file: replaced
    assert pq.read_schema(own).metadata[b"vlp.split"] == b"val"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("model", ["nowhere", "not_a_model"])
def test_a_directory_that_is_no_checkpoint_is_a_one_line_error(
    smoke_data: Path, tmp_path: Path, capsys, model: str
) -> None:
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "bert"}')
    assert _embed(tmp_path / model, smoke_data, tmp_path / "e.parquet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vlp embed: error:" in err


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An existing folder in which no file can be created (for root too, where possible)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder, Path("/sys/fs")]  # root ignores the mode; sysfs refuses root too
    try:
        for candidate in candidates:
            try:
                (candidate / ".vlp-probe").touch()
                (candidate / ".vlp-probe").unlink()
            except OSError:
                yield candidate
                return
        pytest.skip("no read-only folder available to this user")
    finally:
        folder.chmod(0o755)


def test_a_read_only_out_folder_is_named_before_encoding(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, capsys, read_only_folder: Path
) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    out = read_only_folder / "e.parquet"
    assert _embed(model_dir, smoke_data, out, "--split", "test") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {out}: cannot write in {read_only_folder}" in err
