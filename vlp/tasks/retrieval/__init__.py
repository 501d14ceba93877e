"""Image-text retrieval: ITC + ITM finetuning, ITC top-k re-ranked by ITM (`ranking`)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from vlp.tasks.spec import AdaptedBudget, Task

# How a re-ranked candidate is scored (`vlp.tasks.retrieval.ranking`): vlp's sum of logits,
# or BLIP's evaluation (ITM match logit + cosine similarity)
RerankScore = Literal["vlp", "blip"]
RERANK_SCORES: tuple[str, ...] = typing.get_args(RerankScore)
# what a task.json written before `rerank_score` existed was scored with
RECORDED_BEFORE_RERANK_SCORE = "vlp"


@dataclass
class RetrievalConfig(AdaptedBudget):
    """`finetune.retrieval`: training budget and re-ranking depth."""

    rerank_k: int  # ITC candidates per query re-ranked by ITM (a dual encoder has none: ignored)
    rerank_score: RerankScore  # vlp: ITM log-odds + ITC logit; blip: BLIP's ITM logit + cosine


TASK = Task(
    name="retrieval",
    config=RetrievalConfig,
    settings=("rerank_k",),
    primary_metric="rsum",
    plot="recall",
    plot_columns=("k", "i2t", "t2i"),
    inputs=(("image", "binary"), ("text", "string")),
    output=("score", "double"),
    implementation="vlp.tasks.retrieval.task",
    embeddings=True,
    lower_is_better=("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"),
)
