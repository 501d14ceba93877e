"""VQA as multi-label classification over the training answer vocabulary.

Design: an MLP answer head on the fused [ENC] state (image-grounded question encoding)
concatenated with the image tower's global token,
trained with binary cross-entropy against VQA soft scores min(1, count/3) of each
candidate answer among the 10 annotator answers (UNITER/ALBEF-style classifier). A
generative answer decoder (BLIP) was not chosen: the answer space here is closed and small,
a classifier needs one fusion forward per question instead of a decoding loop (cheaper on
CPU, which matters for the 15-minute pipeline budget), and the soft-score BCE directly
optimises the official accuracy. Its limit, documented in the README: an answer never seen
in training (or cut by `max_answers`) can never be predicted.

Answers are counted after the official VQA answer normalisation, so "two" and "2" are one
candidate, as the accuracy metric treats them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError
from vlp.io import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.models.vlp_model import VLPModel

HEAD_FILE = "answer_head.safetensors"
SOFT_SCORE_DENOMINATOR = 3.0  # an answer given by >= 3 annotators is fully correct


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares predictions (digits, no articles)."""
    from vlp.metrics.vqa import normalize_prediction

    return normalize_prediction(answer)


def build_answer_vocab(
    answers_per_question: Iterable[Sequence[str]],
    max_answers: int,
    normalize: Callable[[str], str] = normalize_answer,
) -> list[str]:
    """The `max_answers` most frequent normalised answers (ties broken alphabetically)."""
    counts: Counter[str] = Counter()
    for answers in answers_per_question:
        counts.update(normalize(a) for a in answers)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:max_answers]]


def soft_targets(
    answers_per_question: Sequence[Sequence[str]],
    vocab_index: dict[str, int],
    normalize: Callable[[str], str] = normalize_answer,
) -> torch.Tensor:
    """VQA soft scores [B, A]: min(1, count/3) for each candidate among a question's answers.

    Answers outside the vocabulary contribute nothing (the question may be all-zero).
    """
    out = torch.zeros(len(answers_per_question), len(vocab_index))
    for row, answers in enumerate(answers_per_question):
        for answer, count in Counter(normalize(a) for a in answers).items():
            col = vocab_index.get(answer)
            if col is not None:
                out[row, col] = min(1.0, count / SOFT_SCORE_DENOMINATOR)
    return out


class AnswerHead(nn.Module):
    """Two-layer MLP from a pair feature (`hidden_size` wide) to one logit per vocabulary answer."""

    def __init__(self, hidden_size: int, num_answers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.GELU(),
            nn.LayerNorm(2 * hidden_size),
            nn.Linear(2 * hidden_size, num_answers),
        )

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.net(cls_state)


class VQAModel(nn.Module):
    """A VLPModel plus an answer head; `forward(**batch)` returns the soft-score BCE loss."""

    def __init__(
        self,
        vlp: VLPModel,
        answers: list[str],
        head_lr_multiplier: float = 1.0,
        freeze_image_norm: bool = False,
    ) -> None:
        super().__init__()
        if not answers:
            raise ConfigError("VQA answer vocabulary is empty: the train split has no answers")
        self.vlp = vlp
        self.answers = list(answers)
        # The head starts from random weights and needs a much larger step than the
        # pretrained body, which a single learning rate would either overwrite or starve.
        self.lr_multipliers = {"head.": head_lr_multiplier}
        self.freeze_image_norm = freeze_image_norm
        # Input: fused [ENC] state + global image token. The fused state alone is dominated
        # by the question (cross-attention contributes little after pretraining), so the
        # head would learn answer priors; the direct image token gives it the scene too.
        self.head = AnswerHead(2 * vlp.text_encoder.config.hidden_size, len(self.answers))

    def train(self, mode: bool = True) -> VQAModel:
        """Train mode; with `freeze_image_norm` the image tower's BatchNorm keeps its statistics."""
        super().train(mode)
        if self.freeze_image_norm:
            # Six questions per image make VQA batches repeat images: re-estimating the
            # pretrained BatchNorm statistics from them shifts the image tokens the fusion
            # encoder was pretrained on.
            for module in self.vlp.image_tower.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(False)
        return self

    def logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Answer logits [B, A] for (image, question) pairs: fused [ENC] + global image token."""
        image_embeds, _ = self.vlp.encode_image(pixel_values)
        fused = self.vlp.fuse(image_embeds, input_ids, attention_mask)
        return self.head(torch.cat([fused[:, 0], image_embeds[:, 0]], dim=-1))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        logits = self.logits(pixel_values, input_ids, attention_mask).float()
        # Summed over answers (mean over the batch), as UNITER/ALBEF scale VQA BCE: a plain
        # mean over thousands of mostly-zero targets would shrink the gradient A-fold.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
        return {"loss": loss, "loss_vqa": loss.detach()}

    @torch.no_grad()
    def predict(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[str]:
        """The highest-scoring vocabulary answer of each question."""
        best = self.logits(pixel_values, input_ids, attention_mask).argmax(dim=-1)
        return [self.answers[i] for i in best.tolist()]

    def save_head(self, model_dir: Path) -> None:
        """Write the head weights (safetensors) into a model directory being assembled."""
        from safetensors.torch import save_model

        save_model(self.head, str(Path(model_dir) / HEAD_FILE))

    @classmethod
    def load(cls, vlp: VLPModel, answers: list[str], model_dir: Path) -> VQAModel:
        """Rebuild a VQAModel from a VLPModel, its answer list and `model_dir/answer_head`."""
        from safetensors.torch import load_model

        path = Path(model_dir) / HEAD_FILE
        if not path.exists():
            raise ConfigError(f"{path}: not found; {model_dir} is not a finetuned VQA model")
        model = cls(vlp, answers)
        load_model(model.head, str(path), strict=True, device=str(vlp.temp.device))
        return model


def make_vqa_collate(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    answers: list[str],
    normalize: Callable[[str], str] = normalize_answer,
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate VQADataset items into {pixel_values, input_ids, attention_mask, targets}."""
    from vlp.models.vlp_model import collate_images_and_texts

    index = {a: i for i, a in enumerate(answers)}

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images_and_texts(items, "question", tokenizer, max_length)
        batch["targets"] = soft_targets([it["answers"] for it in items], index, normalize)
        return batch

    return collate


def write_vqa_results(predictions: dict[int, str], path: str | os.PathLike) -> Path:
    """Write the official VQA results JSON: [{"question_id": int, "answer": str}, ...]."""
    rows = [{"question_id": int(q), "answer": a} for q, a in sorted(predictions.items())]
    path = Path(path)
    atomic_write_json(path, rows)
    return path
