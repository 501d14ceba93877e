"""torch Datasets over canonical manifests, with decoded images cached in memory.

Every dataset decodes each image once (the shapes data is small) and keeps it as
uint8, so training epochs never re-decode PNGs. Use `collate` as the DataLoader
`collate_fn`: torch's default would transpose the 10-answer lists of VQA items. Training
batches, whose texts are tokenised, come from `make_pretrain_collate` (image-caption pairs)
and `collate_images_and_texts` (any text field).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vlp.data.manifest import (
    VQA_FILE,
    Splits,
    image_roots,
    locate_image,
    no_rows_in_splits,
    read_pairs,
    read_vqa,
)
from vlp.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def fit_image(img: Image.Image, size: int) -> Image.Image:
    """`img` as RGB at a model's `size` x `size` input (bicubic resize when it differs)."""
    rgb = img.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return rgb


def _uint8(img: Image.Image, size: int) -> torch.Tensor:
    """uint8 [3, size, size] RGB of `img`."""
    arr = np.asarray(fit_image(img, size), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def _open(path: Path, size: int) -> Image.Image:
    """The image at `path` fitted to `size`; DataError naming the file if missing or corrupt."""
    try:
        with Image.open(path) as img:
            return fit_image(img, size)
    except FileNotFoundError as e:
        raise DataError(f"{path}: image not found") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to open: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e


def _decode(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size] RGB; DataError naming the file if it is missing or corrupt."""
    return _uint8(_open(path, size), size)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """FloatTensor [3, size, size]: RGB in [0, 1], then normalised with mean = std = 0.5."""
    return _normalise(_decode(Path(path), size))


def pixels_from_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[N, 3, size, size] float pixels of PIL images, exactly as the datasets give them."""
    return _normalise(torch.stack([_uint8(img, size) for img in images]))


def read_images(
    data_dir: str | os.PathLike, image_paths: Sequence[str], size: int
) -> list[Image.Image]:
    """The dataset's images at manifest `image_paths`, fitted to `size` (one object per path).

    A path that leads through a symlink out of the dataset is refused (`locate_image`).
    """
    data_dir = Path(data_dir)
    roots = image_roots(data_dir)
    opened: dict[str, Image.Image] = {}
    for rel in image_paths:
        if rel not in opened:
            opened[rel] = _open(locate_image(data_dir, rel, roots), size)
    return [opened[rel] for rel in image_paths]


class _ImageCache:
    """Decoded uint8 images of one dataset, keyed by manifest image_path.

    A path that leads through a symlink out of the dataset is refused (`locate_image`).
    """

    def __init__(self, data_dir: Path, image_size: int) -> None:
        self.data_dir = data_dir
        self.image_size = image_size
        self._roots = image_roots(data_dir)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, rel: str) -> torch.Tensor:
        pixels = self._cache.get(rel)
        if pixels is None:
            pixels = _decode(locate_image(self.data_dir, rel, self._roots), self.image_size)
            self._cache[rel] = pixels
        return _normalise(pixels)


class PairsDataset(Dataset):
    """One item per caption: pixel_values, caption, image_id, caption_id.

    With `first_caption_only`, one item per image: its first caption in manifest order.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: Splits,
        image_size: int,
        first_caption_only: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.frame: pd.DataFrame = read_pairs(self.data_dir, split)
        if first_caption_only:
            self.frame = self.frame.drop_duplicates("image_id").reset_index(drop=True)
        if self.frame.empty:
            raise no_rows_in_splits(self.data_dir, split, "caption pairs")
        self._images = _ImageCache(self.data_dir, image_size)
        self._rows = self.frame[["image_path", "caption", "image_id", "caption_id"]].to_dict(
            "records"
        )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self._rows[i]
        return {
            "pixel_values": self._images(row["image_path"]),
            "caption": row["caption"],
            "image_id": int(row["image_id"]),
            "caption_id": int(row["caption_id"]),
        }


class ImagesDataset(Dataset):
    """One item per unique image of the split (first-seen order): pixel_values, image_id."""

    def __init__(self, data_dir: str | os.PathLike, split: Splits, image_size: int) -> None:
        self.data_dir = Path(data_dir)
        pairs = read_pairs(self.data_dir, split)
        if pairs.empty:
            raise no_rows_in_splits(self.data_dir, split, "images")
        self.frame: pd.DataFrame = pairs.drop_duplicates("image_id")[
            ["image_id", "image_path"]
        ].reset_index(drop=True)
        self.image_ids: list[int] = [int(x) for x in self.frame["image_id"]]
        self._paths: list[str] = list(self.frame["image_path"])
        self._images = _ImageCache(self.data_dir, image_size)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self._images(self._paths[i]), "image_id": self.image_ids[i]}


class VQADataset(Dataset):
    """One item per question: pixel_values, question, answers (10 str), ids, types."""

    def __init__(self, data_dir: str | os.PathLike, split: Splits, image_size: int) -> None:
        self.data_dir = Path(data_dir)
        self.frame: pd.DataFrame = read_vqa(self.data_dir, split)
        if self.frame.empty:
            raise no_rows_in_splits(self.data_dir, split, "VQA questions", VQA_FILE)
        self._images = _ImageCache(self.data_dir, image_size)
        self._rows = self.frame.to_dict("records")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self._rows[i]
        return {
            "pixel_values": self._images(row["image_path"]),
            "question": row["question"],
            "answers": list(row["answers"]),
            "question_id": int(row["question_id"]),
            "image_id": int(row["image_id"]),
            "answer_type": row["answer_type"],
            "question_type": row["question_type"],
            "multiple_choice_answer": row["multiple_choice_answer"],
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
