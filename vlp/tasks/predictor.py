"""Inference over a finetuned task model directory: the base of every task's `Predictor`.

Every inference setting comes from the model directory: the image transform it was trained
with (its image processor, or the `ImageTransform` `task.json` records) and its task's settings
(`task.json`, `info`). `batch_size` is how many images, texts or (image,
text) pairs go through one forward pass; it changes nothing but speed and memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from vlp.models.vlp_model import VLPModel


class Predictor:
    """ITC embeddings and scores of any finetuned task model; each task adds its own.

    `model` is a model of any family that does the task (`vlp.models.family`).
    """

    def __init__(
        self, model: VLPModel, info: dict[str, Any], model_dir: Path, batch_size: int = 64
    ) -> None:
        self.model = model.eval()
        self.info = info
        self.model_dir = Path(model_dir)
        self.task: str = info["task"]
        from vlp.models.checkpoints import image_transform

        self.transform = image_transform(info, self.model_dir)
        self.image_size = self.transform.size
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.transform.pixels(images).to(self.device)

    def _chunks(self, n: int) -> list[slice]:
        return [slice(s, s + self.batch_size) for s in range(0, n, self.batch_size)]

    def _image_states(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        from vlp.models.embed import encode_images

        chunks = self._chunks(len(images))
        return encode_images(self.model, (self._pixels(images[sl]) for sl in chunks))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model's tokenizer splits it, special tokens included,
        before the truncation at `max_text_length` that encoding applies."""
        ids = self.model.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised ITC image embeddings [N, E] (float32)."""
        if not images:
            return np.zeros((0, self.model.cfg.embed_dim), dtype=np.float32)
        return self._image_states(images)[1].float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised ITC text embeddings [M, E] (float32)."""
        from vlp.models.embed import embed_texts

        if not texts:
            return np.zeros((0, self.model.cfg.embed_dim), dtype=np.float32)
        return embed_texts(self.model, texts, self.batch_size).float().cpu().numpy()

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Image-text scores [N, M]; here ITC cosine similarity (retrieval re-ranks with ITM)."""
        return self.embed_images(images) @ self.embed_texts(texts).T


def load_predictor(
    model_dir: str | os.PathLike, device: Any = "cpu", batch_size: int = 64
) -> Predictor:
    """Load a finetuned task model directory as its task's `Predictor`.

    `batch_size`: images, texts or (image, text) pairs per forward pass.
    """
    from vlp.models.checkpoints import read_task_info
    from vlp.models.family import load_model
    from vlp.tasks import TASKS

    info = read_task_info(model_dir)
    model = load_model(model_dir, device=device).model
    return TASKS[info["task"]].module().Predictor(model, info, Path(model_dir), batch_size)


def split_images(
    data: Path, split: str, predictor: Predictor, fast_jpeg: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, list[Image.Image]]:
    """(caption pairs, unique images, their PIL images at the predictor's size) of a split.

    The images frame has `image_id` and `image_path`, in first-seen order; DataError if the
    split has no caption pairs. With `fast_jpeg`, JPEGs are decoded at reduced scale.
    """
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import read_images
    from vlp.errors import DataError

    pairs = read_pairs(data, split)
    if pairs.empty:
        raise DataError(f"{data}: no images in split {split!r}")
    images = pairs.drop_duplicates("image_id")[["image_id", "image_path"]].reset_index(drop=True)
    return (
        pairs,
        images,
        read_images(data, list(images["image_path"]), predictor.transform, fast_jpeg),
    )
