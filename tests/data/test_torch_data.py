"""torch Datasets: item layout, normalisation, caching and collation (also of training batches)."""

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
    image_id_key,
    load_image,
    make_pretrain_collate,
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


def test_pretrain_collate_keys_and_stable_image_ids():
    from vlp.models import train_tokenizer

    captions = ["a red circle", "a red circle left of a blue square", "a big blue square"]
    tokenizer = train_tokenizer(captions * 3, vocab_size=60)
    items = [
        {"pixel_values": torch.full((3, 8, 8), float(i)), "caption": c, "image_id": image_id}
        for i, (c, image_id) in enumerate(zip(captions, ["img0", "img0", 7], strict=True))
    ]
    batch = make_pretrain_collate(tokenizer, max_length=16)(items)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["image_ids"].dtype == torch.int64
    assert batch["image_ids"][0] == batch["image_ids"][1] != batch["image_ids"][2]
    assert batch["image_ids"][2] == image_id_key(7)
    assert image_id_key("img0") == image_id_key("img0") != image_id_key(0)
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == lengths.max() < 16  # padded to the longest caption
    assert lengths[0] < lengths[1]
