"""torch Datasets over canonical manifests.

Images are decoded on every access and turned into pixels by the model's evaluation
transform, plus the training augmentation where one is given (`vlp.data.images`);
nothing decoded is cached, so memory does not grow with the dataset. Use `collate` as the DataLoader
`collate_fn`: torch's default would transpose the 10-answer lists of VQA items. Training
batches, whose texts are tokenised, come from `make_pretrain_collate` (image-caption pairs)
and `collate_images_and_texts` (any text field).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlp.data.images import (
    Augmentation,
    ImageTransform,
    Opener,
    open_augmented,
    open_fitted,
    swap_left_right,
)
from vlp.data.manifest import (
    VQA_FILE,
    Splits,
    image_roots,
    locate_image,
    no_rows_in_splits,
    open_image,
    read_pairs,
    read_vqa,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def read_images(
    data_dir: str | os.PathLike,
    image_paths: Sequence[str],
    transform: ImageTransform,
    fast_jpeg: bool = False,
) -> list[Image.Image]:
    """The dataset's images at manifest `image_paths`, fitted by `transform` (one object per path).

    Each image is shrunk to the transform's size as soon as it is decoded (JPEGs decoded at
    reduced scale with `fast_jpeg`, `vlp.data.decode`). A path that leads through a
    symlink out of the dataset is refused (`locate_image`).
    """
    data_dir = Path(data_dir)
    roots = image_roots(data_dir)
    opened: dict[str, Image.Image] = {}
    for rel in image_paths:
        if rel not in opened:
            path = locate_image(data_dir, rel, roots)
            opened[rel] = open_fitted(partial(open_image, path), transform, fast_jpeg)
    return [opened[rel] for rel in image_paths]


# Fitted images (uint8, model size) a dataset keeps in memory: all of a small dataset such as
# the shapes world, a bounded part of a large one, so memory stays flat as datasets grow.
CACHE_BYTES = 256 * 2**20


class ImageReader:
    """Pixels of images by a key (a manifest image_path, a shard sample's image id).

    Without augmentation, each image is decoded and fitted to the model's size once and kept
    (as uint8) until the reader holds `CACHE_BYTES` of them; the rest are decoded on every
    access. With augmentation every access decodes, since each draws its own crop. With
    `fast`, JPEGs are decoded at reduced scale (`vlp.data.decode`).
    """

    def __init__(
        self, transform: ImageTransform, augment: Augmentation | None, fast: bool = False
    ) -> None:
        self.transform = transform
        self.augment = augment
        self.fast = fast
        self._fitted: dict[Any, np.ndarray] = {}
        self._bytes = 0

    def __call__(
        self, key: Any, opener: Opener, index: int, epoch: int
    ) -> tuple[torch.Tensor, bool]:
        """(pixels [3, size, size], whether the image was mirrored) of item `index`.

        `opener` decodes the image (`vlp.data.images.Opener`) when it is not kept.
        """
        if self.augment is not None:
            return open_augmented(opener, self.transform, self.augment, index, epoch, self.fast)
        fitted = self._fitted.get(key)
        if fitted is None:
            fitted = np.asarray(open_fitted(opener, self.transform, self.fast), dtype=np.uint8)
            if self._bytes + fitted.nbytes <= CACHE_BYTES:
                self._fitted[key] = fitted
                self._bytes += fitted.nbytes
        return self.transform.normalise(fitted), False


class _FileReader(ImageReader):
    """An `ImageReader` of a dataset directory's images by manifest image_path.

    A path that leads through a symlink out of the dataset is refused (`locate_image`).
    """

    def __init__(
        self,
        data_dir: Path,
        transform: ImageTransform,
        augment: Augmentation | None,
        fast: bool = False,
    ) -> None:
        super().__init__(transform, augment, fast)
        self.data_dir = data_dir
        self._roots = image_roots(data_dir)

    def read(self, rel: str, index: int, epoch: int) -> tuple[torch.Tensor, bool]:
        opener = partial(open_image, locate_image(self.data_dir, rel, self._roots))
        return self(rel, opener, index, epoch)


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(index, epoch) of a dataset key: an index, or (index, epoch) from the training loop."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


class PairsDataset(Dataset):
    """One item per caption: pixel_values, caption, image_id, caption_id.

    With `first_caption_only`, one item per image: its first caption in manifest order.
    With `fast_jpeg`, JPEGs are decoded at reduced scale (`vlp.data.decode`).
    With `augment`, items are keyed by (index, epoch) in training (`takes_epoch`): each
    epoch draws new crops, and a mirrored image's caption has left and right swapped.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: Splits,
        transform: ImageTransform,
        augment: Augmentation | None = None,
        first_caption_only: bool = False,
        fast_jpeg: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.frame: pd.DataFrame = read_pairs(self.data_dir, split)
        if first_caption_only:
            self.frame = self.frame.drop_duplicates("image_id").reset_index(drop=True)
        if self.frame.empty:
            raise no_rows_in_splits(self.data_dir, split, "caption pairs")
        self._images = _FileReader(self.data_dir, transform, augment, fast_jpeg)
        self.takes_epoch = augment is not None
        self._rows = self.frame[["image_path", "caption", "image_id", "caption_id"]].to_dict(
            "records"
        )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = _key(key)
        row = self._rows[i]
        pixels, flipped = self._images.read(row["image_path"], i, epoch)
        caption = swap_left_right(row["caption"]) if flipped else row["caption"]
        return {
            "pixel_values": pixels,
            "caption": caption,
            "image_id": int(row["image_id"]),
            "caption_id": int(row["caption_id"]),
        }


class ImagesDataset(Dataset):
    """One item per unique image of the split (first-seen order): pixel_values, image_id.

    With `augment`, items are keyed by (index, epoch) in training (`takes_epoch`), as in
    `PairsDataset`: each epoch draws new crops.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: Splits,
        transform: ImageTransform,
        augment: Augmentation | None = None,
        fast_jpeg: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        pairs = read_pairs(self.data_dir, split)
        if pairs.empty:
            raise no_rows_in_splits(self.data_dir, split, "images")
        self.frame: pd.DataFrame = pairs.drop_duplicates("image_id")[
            ["image_id", "image_path"]
        ].reset_index(drop=True)
        self.image_ids: list[int] = [int(x) for x in self.frame["image_id"]]
        self._paths: list[str] = list(self.frame["image_path"])
        self._images = _FileReader(self.data_dir, transform, augment, fast_jpeg)
        self.takes_epoch = augment is not None

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = _key(key)
        pixels, _ = self._images.read(self._paths[i], i, epoch)
        return {"pixel_values": pixels, "image_id": self.image_ids[i]}


class VQADataset(Dataset):
    """One item per question: pixel_values, question, answers (10 str), ids, types.

    With `augment`, as `PairsDataset`: a mirrored image's question and answers have left
    and right swapped.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: Splits,
        transform: ImageTransform,
        augment: Augmentation | None = None,
        fast_jpeg: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.frame: pd.DataFrame = read_vqa(self.data_dir, split)
        if self.frame.empty:
            raise no_rows_in_splits(self.data_dir, split, "VQA questions", VQA_FILE)
        self._images = _FileReader(self.data_dir, transform, augment, fast_jpeg)
        self.takes_epoch = augment is not None
        self._rows = self.frame.to_dict("records")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = _key(key)
        row = self._rows[i]
        pixels, flipped = self._images.read(row["image_path"], i, epoch)
        texts = swap_left_right if flipped else str
        return {
            "pixel_values": pixels,
            "question": texts(row["question"]),
            "answers": [texts(a) for a in row["answers"]],
            "question_id": int(row["question_id"]),
            "image_id": int(row["image_id"]),
            "answer_type": row["answer_type"],
            "question_type": row["question_type"],
            "multiple_choice_answer": texts(row["multiple_choice_answer"]),
        }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors stacked, ints as a LongTensor, everything else as a list."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


def image_id_key(image_id: Any) -> int:
    """A stable int64 for any image id (str or int), equal across processes and runs."""
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def collate_images_and_texts(
    items: list[dict[str, Any]], text_key: str, tokenizer: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """Stack items' pixel_values and tokenize their `text_key` texts, padded to the longest."""
    enc = tokenizer(
        [it[text_key] for it in items],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


def make_pretrain_collate(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate PairsDataset items into {pixel_values, input_ids, attention_mask, image_ids}.

    Captions are padded to the batch's longest (at most `max_length` tokens); image ids
    become stable int64 keys (`image_id_key`) so equal images match across processes.
    """

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images_and_texts(items, "caption", tokenizer, max_length)
        batch["image_ids"] = torch.tensor([image_id_key(it["image_id"]) for it in items])
        return batch

    return collate
