"""ITC features of many images or texts, computed batch by batch (retrieval, zero-shot)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlp.models.vlp_model import VLPModel


@torch.no_grad()
def encode_images(
    model: VLPModel, pixel_batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds [N, L, H], image_feat [N, E]) of all images, batch by batch."""
    embeds, feats = [], []
    device = model.temp.device
    for pixels in pixel_batches:
        e, f = model.encode_image(pixels.to(device))
        embeds.append(e)
        feats.append(f)
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_texts(
    model: VLPModel, texts: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [M, T], attention_mask [M, T], text_feat [M, E]), padded to one length T.

    For ITM re-ranking, whose pair batches index texts across encoding batches.
    """
    enc = model.tokenize(texts)  # pad all texts together: pairs index rows across batches
    feats = []
    for start in range(0, len(texts), batch_size):
        ids = enc["input_ids"][start : start + batch_size]
        mask = enc["attention_mask"][start : start + batch_size]
        feats.append(model.encode_text(ids, mask)[1])
    return enc["input_ids"], enc["attention_mask"], torch.cat(feats)


@torch.no_grad()
def embed_texts(model: VLPModel, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """text_feat [M, E] of all texts; each batch is padded to its own longest text only."""
    feats = []
    for start in range(0, len(texts), batch_size):
        enc = model.tokenize(list(texts[start : start + batch_size]))
        feats.append(model.encode_text(enc["input_ids"], enc["attention_mask"])[1])
    return torch.cat(feats)
