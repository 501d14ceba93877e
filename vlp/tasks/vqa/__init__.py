"""VQA: an answer decoder and classifier over the pretrained encoders (`model`), or answers
written by a generative family (`generative`)."""

from __future__ import annotations

from dataclasses import dataclass

from vlp.tasks.spec import AdaptedBudget, Task


@dataclass
class VQAConfig(AdaptedBudget):
    """`finetune.vqa`: training budget and the answer decoder."""

    max_answers: int  # answer vocabulary = most frequent train answers
    head_lr_multiplier: float  # answer decoder + classifier lr = lr * this
    freeze_encoders: bool  # keep the image tower and text encoder as given
    answer_layers: int  # layers of the answer decoder
    answer_heads: int  # attention heads of the answer decoder
    answer_max_length: int  # tokens of a written answer at most (families that write answers)


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
    evaluate_options=("vqa_protocol",),
)
