"""VQA as text generation, for the families that write their answers (`Family.generates_answers`).

The model reads the image and the question and writes the answer: BLIP's answer decoder
reads the question fused with the image (`finetune.vqa.head: generate`, the fusion family);
T5's encoder reads the image tokens and the question together; GPT-2 reads the question as a
prompt and continues it. It is finetuned with the cross-entropy of each question's most common answer
(`multiple_choice_answer`, VQA v2's own), and answers greedily with at most
`finetune.vqa.answer_max_length` tokens. Its task.json records `generative: true`, that
length, and no answer vocabulary: any text is an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlp.errors import ConfigError
from vlp.tasks.spec import TrainingSetup

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import Config
    from vlp.models.family import Family


def writes_answers(family: Family, head: str) -> bool:
    """Whether a model of `family` answers by writing with `finetune.vqa.head` = `head` (a
    family without an answer classifier always writes); ConfigError if it cannot write."""
    if head == "generate" and not family.generates_answers:
        raise ConfigError(
            f"finetune.vqa.head: generate, but model.family {family.name} ({family.description})"
            " has no decoder that writes answers: use head: classifier"
        )
    return family.generates_answers and (head == "generate" or not family.answer_classifier)


class AnswerObjective(nn.Module):
    """A generative model trained to write the answers: `forward(**batch)` takes a
    `make_answer_collate` batch and returns {"loss", "loss_vqa"}."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        loss = self.model.answer_loss(
            pixel_values, input_ids, attention_mask, answer_ids, answer_mask
        )
        return {"loss": loss, "loss_vqa": loss.detach()}


def make_answer_collate(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate VQADataset items into {pixel_values, input_ids, attention_mask (the questions),
    answer_ids, answer_mask (their most common answers)}, each padded to the longest."""
    from vlp.data.torch_data import collate_images_and_texts

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images_and_texts(items, "question", tokenizer, max_length)
        answers = tokenizer(
            [it["multiple_choice_answer"] for it in items],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch["answer_ids"] = answers["input_ids"]
        batch["answer_mask"] = answers["attention_mask"]
        return batch

    return collate


def setup(cfg: Config, model: Any, dataset: Any) -> TrainingSetup:
    """The model trained to write the answers of `dataset` (the VQA train splits)."""
    tcfg = cfg.finetune.vqa
    info = {"generative": True, "answers": [], "answer_max_length": tcfg.answer_max_length}
    collate = make_answer_collate(model.tokenizer, cfg.model.max_text_length)
    return TrainingSetup(AnswerObjective(model), dataset, collate, info)
