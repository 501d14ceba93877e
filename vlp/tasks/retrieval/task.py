"""Retrieval's torch side: ITC + ITM finetuning, the re-ranking predictor, R@K evaluation.

A model whose family has no ITM head (`Family.has_itm`; the dual encoder, `model.family:
clip`) is finetuned with its family's objective alone (CLIP's contrastive loss) and ranks by
ITC; its `task.json` records `rerank_k: 0` (`finetune.retrieval.rerank_k` is ignored for it).
A model with an ITM head records `rerank_score` too (`vlp.tasks.retrieval.ranking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlp.models.objectives import ObjectiveWeights
from vlp.tasks.predictor import Predictor as BasePredictor
from vlp.tasks.retrieval import RECORDED_BEFORE_RERANK_SCORE, RERANK_SCORES, RerankScore
from vlp.tasks.retrieval.ranking import RetrievalScores, retrieval_scores
from vlp.tasks.spec import Example, TaskEval, TrainingSetup

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config

LOSS_WEIGHTS = ObjectiveWeights(itc=1.0, itm=1.0, lm=0.0)
TOP_RESULTS = 10  # ranked items per query in the results file


def setup(cfg: Config, vlp: Any, init: str) -> TrainingSetup:
    """The model trained with its family's objective on the captions of `finetune.splits`:
    ITC + ITM (hard negatives) for the fusion family; a family without ITM (the dual encoder,
    CLIP's contrastive loss) ranks by ITC alone (`rerank_k` 0)."""
    from vlp.data.decode import fast_decode
    from vlp.data.images import image_transforms
    from vlp.data.shard_stream import pairs_for_training
    from vlp.data.torch_data import make_pretrain_collate
    from vlp.models.family import get_family

    dataset = pairs_for_training(
        cfg.data.root,
        cfg.data.shards,
        cfg.finetune.splits,
        *image_transforms(cfg, cfg.finetune.init_dir),
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        fast_jpeg=fast_decode(cfg.images.fast_decode, training=True),
    )
    family = get_family(vlp.cfg.family)
    objective = family.impl().objective(vlp, LOSS_WEIGHTS, cfg.runtime.local_loss)
    return TrainingSetup(
        objective,
        dataset,
        make_pretrain_collate(vlp.tokenizer, vlp.cfg.max_text_length),
        {
            "rerank_k": cfg.finetune.retrieval.rerank_k if family.has_itm else 0,
            "rerank_score": cfg.finetune.retrieval.rerank_score,
        },
    )


def has_itm(model: Any) -> bool:
    """Whether `model`'s family re-ranks with an ITM head (else retrieval ranks by ITC alone)."""
    from vlp.models.family import get_family

    return get_family(model.cfg.family).has_itm


def recorded_rerank_score(info: dict[str, Any], where: Path) -> RerankScore:
    """The `rerank_score` a retrieval task.json records (one written before it existed: vlp's)."""
    from vlp.errors import ConfigError

    score = info.get("rerank_score", RECORDED_BEFORE_RERANK_SCORE)
    if score not in RERANK_SCORES:
        raise ConfigError(
            f"{where}/task.json: rerank_score {score!r} is not one of {', '.join(RERANK_SCORES)}"
        )
    return score


def rerank_score_for(
    given: str | None, task_info: dict[str, Any] | None, where: Path, default: RerankScore
) -> RerankScore:
    """How a checkpoint's re-ranked candidates are scored: `given` (`--rerank-score`), else a
    retrieval task model's own (`task_info`: the task.json in `where`), else `default`."""
    from vlp.errors import ConfigError

    if given is not None:
        if given not in RERANK_SCORES:
            raise ConfigError(f"--rerank-score: {given!r} is not one of {', '.join(RERANK_SCORES)}")
        return given
    if task_info is not None and task_info.get("task") == "retrieval":
        return recorded_rerank_score(task_info, where)
    return default


def save(module: Any, model_dir: Path) -> None:
    """Write the trained VLPModel into a model directory being assembled."""
    module.model.cpu().save_pretrained(model_dir)


class Predictor(BasePredictor):
    """Retrieval: `score` is ITC top-k re-ranked by ITM in both directions (k = rerank_k);
    a dual encoder's is its ITC logit (cosine / temperature), never re-ranked."""

    @torch.no_grad()
    def rank(self, images: Sequence[Image.Image], texts: Sequence[str]) -> RetrievalScores:
        """ITC similarities and their ITM re-rankings per direction, [N, M] each."""
        from vlp.models.embed import encode_texts

        image_embeds, image_feat = self._image_states(images)
        ids, mask, text_feat = encode_texts(self.model, list(texts), self.batch_size)
        k = int(self.info["rerank_k"]) if has_itm(self.model) else 0
        return retrieval_scores(
            self.model, image_embeds, image_feat, ids, mask, text_feat, k, self.batch_size,
            score=recorded_rerank_score(self.info, self.model_dir),
        )  # fmt: skip

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """[N, M] scores: ITM log-odds + ITC logit for pairs in either direction's top k.

        Pairs in neither top k get their ITC logit - 1e4 (ranked below every candidate).
        Both directions give a re-ranked pair the same score, so one matrix serves both.
        """
        if not images or not texts:
            return np.zeros((len(images), len(texts)), dtype=np.float32)
        s = self.rank(images, texts)
        return torch.maximum(s.i2t, s.t2i).float().cpu().numpy()


def evaluate(cfg: Config, predictor: Predictor, data: Path) -> TaskEval:
    """R@1/5/10 both ways (and rsum) after ITM re-ranking of the ITC top-k; ITC-only too."""
    from vlp.data.decode import fast_decode
    from vlp.data.manifest import resolve_image
    from vlp.metrics.retrieval import KS, retrieval_recall
    from vlp.tasks.predictor import split_images

    pairs, images, pil = split_images(
        data, cfg.evaluate.split, predictor, fast_decode(cfg.images.fast_decode, training=False)
    )
    image_ids = [int(x) for x in images["image_id"]]
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    captions = [str(c) for c in pairs["caption"]]

    s = predictor.rank(pil, captions)
    i2t, t2i = s.i2t.float().cpu(), s.t2i.float().cpu()
    metrics = retrieval_recall(text_to_image, s.itc, s.i2t, s.t2i)

    rows = [{"k": x, "i2t": metrics[f"i2t_R@{x}"], "t2i": metrics[f"t2i_R@{x}"]} for x in KS]

    caption_ids = [int(c) for c in pairs["caption_id"]]
    top_texts = i2t.topk(min(TOP_RESULTS, i2t.shape[1]), dim=1).indices
    top_images = t2i.t().topk(min(TOP_RESULTS, i2t.shape[0]), dim=1).indices
    results = {
        "i2t": {
            str(image_ids[i]): [caption_ids[j] for j in row]
            for i, row in enumerate(top_texts.tolist())
        },
        "t2i": {
            str(caption_ids[j]): [image_ids[i] for i in row]
            for j, row in enumerate(top_images.tolist())
        },
    }
    by_image = pairs.groupby("image_id", sort=False)["caption"].apply(list).to_dict()
    examples = [
        Example(
            image_path=resolve_image(data, images["image_path"][i]),
            ground_truth=[str(c) for c in by_image[image_ids[i]]],
            prediction=captions[int(top_texts[i, 0])],
            query="top-1 retrieved caption",
        )
        for i in range(min(cfg.evaluate.num_examples, len(images)))
    ]
    return TaskEval(metrics, results, rows, examples)


def serve(
    predictor: Any, images: list[Any], texts: dict[str, list[str]], params: dict, limits: Any
) -> dict[str, Any]:
    """One score per request row: its (image, text) pair."""
    # the diagonal of the image x text score matrix
    scores = np.asarray(predictor.score(images, texts["text"]))
    return {"score": np.diagonal(scores).astype(float)}
