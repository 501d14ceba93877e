"""Image captioning: finetune the caption decoder with the LM loss, decode with beam search.

Finetuning reuses the family's pretraining objective with only the LM term switched on
(`Family.impl().objective(model, CAPTION_LOSS_WEIGHTS)`), so the loop, collate and loss are the
pretraining ones. Decoding goes through transformers' `generate` (`generate_captions`) with
the beam size and length recorded in the model's `task.json`. Results are written in the
COCO caption results format, `[{"image_id", "caption"}]`, so the same file can be scored
by `vlp eval captions` or the official toolkit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from vlp.models.objectives import ObjectiveWeights
from vlp.tasks.predictor import Predictor as BasePredictor
from vlp.tasks.spec import Example, TaskEval, TrainingSetup

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config

CAPTION_LOSS_WEIGHTS = ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0)


def setup(cfg: Config, vlp: Any, init: str) -> TrainingSetup:
    """The model trained with the LM loss alone, as its family trains it, on the captions of
    `finetune.splits`."""
    from vlp.data.decode import fast_decode
    from vlp.data.images import image_transforms
    from vlp.data.shard_stream import pairs_for_training
    from vlp.data.torch_data import make_pretrain_collate
    from vlp.models.family import get_family

    tcfg = cfg.finetune.captioning
    objective = get_family(vlp.cfg.family).impl().objective
    return TrainingSetup(
        objective(vlp, CAPTION_LOSS_WEIGHTS, cfg.runtime.local_loss),
        pairs_for_training(
            cfg.data.root,
            cfg.data.shards,
            cfg.finetune.splits,
            *image_transforms(cfg, cfg.finetune.init_dir),
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            fast_jpeg=fast_decode(cfg.images.fast_decode, training=True),
        ),
        make_pretrain_collate(vlp.tokenizer, vlp.cfg.max_text_length),
        {"beam_size": tcfg.beam_size, "max_length": tcfg.max_length},
    )


def save(module: Any, model_dir: Path) -> None:
    """Write the trained VLPModel into a model directory being assembled."""
    module.model.cpu().save_pretrained(model_dir)


class Predictor(BasePredictor):
    """Captioning: beam-search captions with the model's recorded decoding settings."""

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image (`beam_size` beams, at most `max_length` tokens)."""
        out: list[str] = []
        for sl in self._chunks(len(images)):
            out += self.model.generate_captions(
                self._pixels(images[sl]),
                num_beams=int(self.info["beam_size"]),
                max_length=int(self.info["max_length"]),
            )
        return out


def references(pairs: pd.DataFrame) -> dict[int, list[str]]:
    """Reference captions per image_id from a pairs manifest (manifest order kept)."""
    return {int(i): list(g) for i, g in pairs.groupby("image_id", sort=True)["caption"]}


def evaluate(cfg: Config, predictor: Predictor, data: Path) -> TaskEval:
    """BLEU-1..4, ROUGE-L and CIDEr-D of beam-search captions against all references."""
    from vlp.data.decode import fast_decode
    from vlp.data.manifest import resolve_image
    from vlp.metrics.caption import score_captions
    from vlp.tasks.predictor import split_images

    fast = fast_decode(cfg.images.fast_decode, training=False)
    pairs, images, pil = split_images(data, cfg.evaluate.split, predictor, fast)
    image_ids = [int(x) for x in images["image_id"]]
    refs = references(pairs)
    captions = dict(zip(image_ids, predictor.caption(pil), strict=True))
    metrics = {k: float(v) for k, v in score_captions(captions, refs).items()}
    results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]
    rows = [{"metric": k, "score": v} for k, v in metrics.items()]
    examples = [
        Example(
            image_path=resolve_image(data, images["image_path"][i]),
            ground_truth=refs[image_id],
            prediction=captions[image_id],
        )
        for i, image_id in enumerate(image_ids[: cfg.evaluate.num_examples])
    ]
    return TaskEval(metrics, results, rows, examples)


def serve(
    predictor: Any, images: list[Any], texts: dict[str, list[str]], params: dict, limits: Any
) -> dict[str, list]:
    """One caption per request row."""
    return {"caption": list(predictor.caption(images))}
