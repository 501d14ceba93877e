"""Image captioning: finetune the caption decoder with the LM loss, decode with beam search.

Finetuning reuses the pretraining objective with only the LM term switched on
(`VLPObjective(model, CAPTION_LOSS_WEIGHTS)`), so the loop, collate and loss are the
pretraining ones. Decoding goes through transformers' `generate` (`VLPModel.generate_captions`).
`vlp evaluate` writes results in the COCO caption results format,
`[{"image_id", "caption"}]`, so the same file can be scored by `vlp eval captions` or the
official toolkit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pandas as pd
import torch

from vlp.models.objectives import ObjectiveWeights

if TYPE_CHECKING:
    from vlp.models.vlp_model import VLPModel

CAPTION_LOSS_WEIGHTS = ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0)


def references(pairs: pd.DataFrame) -> dict[int, list[str]]:
    """Reference captions per image_id from a pairs manifest (manifest order kept)."""
    return {int(i): list(g) for i, g in pairs.groupby("image_id", sort=True)["caption"]}


@torch.no_grad()
def generate(
    model: VLPModel,
    batches: Iterable[tuple[torch.Tensor, list[int]]],
    num_beams: int,
    max_length: int,
) -> dict[int, str]:
    """Caption every image of `(pixel_values, image_ids)` batches: {image_id: caption}."""
    device = model.temp.device
    out: dict[int, str] = {}
    for pixels, ids in batches:
        captions = model.generate_captions(
            pixels.to(device), num_beams=num_beams, max_length=max_length
        )
        out.update(zip((int(i) for i in ids), captions, strict=True))
    return out
