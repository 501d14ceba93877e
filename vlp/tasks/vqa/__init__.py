"""VQA: an answer decoder and classifier over the pretrained encoders (`model`), or answers
written by the model (`generative`: BLIP's answer decoder, GPT-2, T5)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from vlp.tasks.spec import AdaptedBudget, Task

# classifier: vlp's answer classifier over the encoders; generate: the model writes the
# answer (BLIP's VQA); a family without a classifier always writes (`Family.answer_classifier`)
VQAHead = Literal["classifier", "generate"]
VQA_HEADS: tuple[str, ...] = typing.get_args(VQAHead)


@dataclass
class VQAConfig(AdaptedBudget):
    """`finetune.vqa`: training budget and the answer decoder."""

    head: VQAHead  # how the model answers: vlp's classifier, or written by its decoder

    max_answers: int  # answer vocabulary = most frequent train answers
    head_lr_multiplier: float  # answer decoder + classifier lr = lr * this
    freeze_encoders: bool  # keep the image tower and text encoder as given
    answer_layers: int  # layers of the answer decoder
    answer_heads: int  # attention heads of the answer decoder
    answer_max_length: int  # tokens of a written answer at most (`head: generate`)


TASK = Task(
    name="vqa",
    config=VQAConfig,
    settings=("answers",),
    primary_metric="overall",
    plot="accuracy",
    plot_columns=("answer_type", "accuracy"),
    inputs=(("image", "binary"), ("question", "string")),
    output=("answer", "string"),
    implementation="vlp.tasks.vqa.task",
    zeroshot="vlp.tasks.vqa.zeroshot",
    evaluate_options=("vqa_protocol",),
    eval_manifest="vqa.parquet",
)
