"""Image captioning: LM finetuning of the caption decoder, beam-search decoding (`task`)."""

from __future__ import annotations

from dataclasses import dataclass

from vlp.tasks.spec import AdaptedBudget, Task


@dataclass
class CaptioningConfig(AdaptedBudget):
    """`finetune.captioning`: training budget and decoding."""

    beam_size: int
    max_length: int  # generated tokens at most


TASK = Task(
    name="captioning",
    config=CaptioningConfig,
    settings=("beam_size", "max_length"),
    primary_metric="CIDEr",
    plot="scores",
    plot_columns=("metric", "score"),
    inputs=(("image", "binary"),),
    output=("caption", "string"),
    implementation="vlp.tasks.captioning.task",
    zeroshot="vlp.tasks.captioning.zeroshot",
)
