"""torch Datasets: item layout, decoding per access and collation (also of training batches)."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlp.data.images import image_transforms
from vlp.data.torch_data import (
    ImagesDataset,
    PairsDataset,
    VQADataset,
    collate,
    image_id_key,
    open_image,
    make_pretrain_collate,
)
from vlp.errors import DataError


def _transform(cfg):
    return image_transforms(cfg)[0]


def test_open_image_names_a_corrupt_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        open_image(tmp_path / "bad.png")


def test_pairs_dataset_items(smoke_cfg, smoke_data):
    ds = PairsDataset(smoke_data, "train", _transform(smoke_cfg))
    assert len(ds) == smoke_cfg.data.n_train * smoke_cfg.data.captions_per_image
    item = ds[0]
    assert set(item) == {"pixel_values", "caption", "image_id", "caption_id"}
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert isinstance(item["caption"], str) and item["caption"]


def test_images_dataset_one_item_per_image(smoke_cfg, smoke_data):
    ds = ImagesDataset(smoke_data, "test", _transform(smoke_cfg))
    assert len(ds) == smoke_cfg.data.n_test
    assert len(set(ds.image_ids)) == len(ds)
    assert ds[0]["image_id"] == ds.image_ids[0]


def test_vqa_dataset_and_collate_keep_answer_lists(smoke_cfg, smoke_data):
    ds = VQADataset(smoke_data, "val", _transform(smoke_cfg))
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["question_id"].dtype == torch.long
    assert len(batch["answers"]) == 4 and all(len(a) == 10 for a in batch["answers"])
    assert batch["answer_type"][0] in {"yes/no", "number", "other"}


def test_datasets_keep_a_bounded_number_of_fitted_images(smoke_cfg, smoke_data, tmp_path, monkeypatch):
    """Fitted images are kept up to CACHE_BYTES per dataset; past that, decoded per access."""
    from vlp.data import torch_data

    data = shutil.copytree(smoke_data, tmp_path / "copy")
    one = 3 * 32 * 32  # bytes of one fitted smoke image
    monkeypatch.setattr(torch_data, "CACHE_BYTES", 2 * one)
    ds = PairsDataset(data, "val", _transform(smoke_cfg))
    first = [ds[i]["pixel_values"] for i in range(len(ds))]
    kept = set(ds._images._fitted)
    assert len(kept) == 2 and ds._images._bytes == 2 * one
    shutil.rmtree(data / "images")
    for i, row in enumerate(ds._rows):  # kept images still serve; the others decode again
        if row["image_path"] in kept:
            assert torch.equal(ds[i]["pixel_values"], first[i])
        else:
            with pytest.raises(DataError, match="image not found"):
                ds[i]


def test_empty_split_is_an_error(smoke_cfg, smoke_data):
    with pytest.raises(DataError, match="restval"):
        PairsDataset(smoke_data, "restval", _transform(smoke_cfg))


def test_symlink_out_of_the_dataset_is_refused(smoke_cfg, smoke_data, tmp_path):
    data = shutil.copytree(smoke_data, tmp_path / "shapes")
    ds = PairsDataset(data, "train", _transform(smoke_cfg))
    rel = ds.frame.loc[0, "image_path"]
    outside = tmp_path / "outside.png"
    shutil.copy(data / rel, outside)
    (data / rel).unlink()
    (data / rel).symlink_to(outside)
    with pytest.raises(DataError, match=f"{rel}' leads through a symlink to {outside}"):
        PairsDataset(data, "train", _transform(smoke_cfg))[0]


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
