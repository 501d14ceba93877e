"""Image-text retrieval: ITC + ITM finetuning, ITC top-k re-ranked by ITM (`ranking`)."""

from __future__ import annotations

from dataclasses import dataclass

from vlp.tasks.spec import AdaptedBudget, Task


@dataclass
class RetrievalConfig(AdaptedBudget):
    """`finetune.retrieval`: training budget and re-ranking depth."""

    rerank_k: int  # ITC candidates per query re-ranked by ITM (a dual encoder has none: ignored)


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
)
