"""torch Datasets: item layout, normalisation, caching and collation."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlp.data.torch_data import (
    ImagesDataset,
    PairsDataset,
    VQADataset,
    collate,
    load_image,
)
from vlp.errors import DataError


def test_load_image_normalises_to_minus_one_one(tmp_path):
    img = Image.new("RGB", (20, 20), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    img.save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 20)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert x[:, 5, 5].tolist() == [-1.0, -1.0, -1.0]
    assert load_image(tmp_path / "a.png", 8).shape == (3, 8, 8)


def test_load_image_names_a_corrupt_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png", 8)


def test_pairs_dataset_items(smoke_cfg, smoke_data):
    ds = PairsDataset(smoke_data, "train", smoke_cfg.data.image_size)
    assert len(ds) == smoke_cfg.data.n_train * smoke_cfg.data.captions_per_image
    item = ds[0]
    assert set(item) == {"pixel_values", "caption", "image_id", "caption_id"}
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert isinstance(item["caption"], str) and item["caption"]


def test_images_dataset_one_item_per_image(smoke_cfg, smoke_data):
    ds = ImagesDataset(smoke_data, "test", smoke_cfg.data.image_size)
    assert len(ds) == smoke_cfg.data.n_test
    assert len(set(ds.image_ids)) == len(ds)
    assert ds[0]["image_id"] == ds.image_ids[0]


def test_vqa_dataset_and_collate_keep_answer_lists(smoke_cfg, smoke_data):
    ds = VQADataset(smoke_data, "val", smoke_cfg.data.image_size)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["question_id"].dtype == torch.long
    assert len(batch["answers"]) == 4 and all(len(a) == 10 for a in batch["answers"])
    assert batch["answer_type"][0] in {"yes/no", "number", "other"}


def test_images_are_decoded_once(smoke_cfg, smoke_data, tmp_path):
    data = shutil.copytree(smoke_data, tmp_path / "copy")
    ds = PairsDataset(data, "val", smoke_cfg.data.image_size)
    first = ds[0]["pixel_values"]
    shutil.rmtree(data / "images")  # a re-decode would now fail
    assert torch.equal(ds[0]["pixel_values"], first)


def test_empty_split_is_an_error(smoke_cfg, smoke_data):
    with pytest.raises(DataError, match="restval"):
        PairsDataset(smoke_data, "restval", smoke_cfg.data.image_size)


def test_symlink_out_of_the_dataset_is_refused(smoke_cfg, smoke_data, tmp_path):
    data = shutil.copytree(smoke_data, tmp_path / "shapes")
    ds = PairsDataset(data, "train", smoke_cfg.data.image_size)
    rel = ds.frame.loc[0, "image_path"]
    outside = tmp_path / "outside.png"
    shutil.copy(data / rel, outside)
    (data / rel).unlink()
    (data / rel).symlink_to(outside)
    with pytest.raises(DataError, match=f"{rel}' leads through a symlink to {outside}"):
        PairsDataset(data, "train", smoke_cfg.data.image_size)[0]
