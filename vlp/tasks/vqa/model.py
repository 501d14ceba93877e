"""VQA as multi-label classification over the training answer vocabulary.

Design: the question, encoded by the pretrained (unimodal) text encoder, goes through a
small answer decoder (a pre-LayerNorm transformer decoder, torch's `nn.TransformerDecoder`)
whose cross-attention reads the image tokens, each with a learned cell position added;
the decoder's first state ([CLS]) goes through an MLP that gives one logit per answer. It
is trained with binary cross-entropy against VQA soft scores min(1, count/3) of each
candidate answer among the 10 annotator answers (UNITER/ALBEF-style classifier). With
`freeze_encoders` the pretrained image tower and text encoder stay as they are and only
the answer decoder learns, as BLIP-2 bridges frozen encoders.

Why a fresh answer decoder and not the pretrained fusion encoder's [ENC] state: most
questions name an object by some attributes and ask for another ("what color is the small
circle?"). On the shapes world, from one pretrained model with the same data and epochs,
this decoder over the frozen encoders learns those look-ups better, in less time, than an
MLP on the [ENC] state with the whole model finetuning (docs/2026-12-01-vqa.md;
`benchmarks/bench_vqa_heads.py`).

BLIP's generative answer decoder is the other head (`finetune.vqa.head: generate`,
`vlp.tasks.vqa.generative`); the classifier is the default: the answer space here is closed
and small, a classifier needs one forward per question instead of a decoding loop (cheaper
on CPU, which matters for the 15-minute pipeline budget), and the soft-score BCE directly
optimises the official accuracy. Its limit (docs/design.md): an answer never seen
in training (or cut by `max_answers`) can never be predicted.

Answers are counted after the official VQA answer normalisation, so "two" and "2" are one
candidate, as the accuracy metric treats them.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlp.errors import ConfigError
from vlp.models.towers import learned_positions, resize_positions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.models.vlp_model import VLPModel

HEAD_FILE = "answer_head.safetensors"
SOFT_SCORE_DENOMINATOR = 3.0  # an answer given by >= 3 annotators is fully correct


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares predictions (digits, no articles)."""
    from vlp.metrics.vqa import normalize_answer as normalize

    return normalize(answer)


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
    """Answer decoder + classifier: (image tokens, question states) -> one logit per answer.

    The question states self-attend and cross-attend to the image tokens in `num_layers`
    pre-LayerNorm transformer decoder layers; the image tokens first get a learned position
    (one for the global token, a grid resized to the image's square token grid). The
    first question state then goes through a two-layer MLP.
    """

    def __init__(
        self,
        hidden_size: int,
        num_answers: int,
        num_layers: int = 2,
        num_heads: int = 8,
        image_width: int | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"finetune.vqa.answer_layers: must be >= 1, got {num_layers}")
        if num_heads < 1 or hidden_size % num_heads:
            raise ConfigError(
                f"finetune.vqa.answer_heads: {num_heads} does not divide the hidden size "
                f"{hidden_size}"
            )
        layer = nn.TransformerDecoderLayer(
            hidden_size,
            num_heads,
            2 * hidden_size,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        # image tokens wider or narrower than the text (BLIP's vision tower) are projected
        self.image_proj = (
            nn.Linear(image_width, hidden_size)
            if image_width is not None and image_width != hidden_size
            else None
        )
        self.pos_global, self.pos_grid = learned_positions(hidden_size)
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.GELU(),
            nn.LayerNorm(2 * hidden_size),
            nn.Linear(2 * hidden_size, num_answers),
        )

    def image_positions(self, num_tokens: int) -> torch.Tensor:
        """[1, num_tokens, H] positions: the global token's, then the grid's, row by row."""
        side = math.isqrt(num_tokens - 1)
        if num_tokens < 2 or side * side != num_tokens - 1:
            raise ConfigError(
                f"VQA needs a global image token plus a square grid; got {num_tokens} tokens"
            )
        grid = resize_positions(self.pos_grid, (side, side))
        return torch.cat([self.pos_global, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(
        self,
        image_embeds: torch.Tensor,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        if self.image_proj is not None:
            image_embeds = self.image_proj(image_embeds)
        memory = image_embeds + self.image_positions(image_embeds.shape[1]).to(image_embeds)
        states = self.decoder(
            question_states.to(memory.dtype), memory, tgt_key_padding_mask=question_mask == 0
        )
        return self.net(states[:, 0])


class VQAModel(nn.Module):
    """A VLPModel plus an answer decoder; `forward` returns the answer logits."""

    def __init__(
        self,
        vlp: VLPModel,
        answers: list[str],
        head_lr_multiplier: float = 1.0,
        freeze_image_norm: bool = False,
        freeze_encoders: bool = False,
        answer_layers: int = 2,
        answer_heads: int = 8,
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
        self.freeze_encoders = freeze_encoders
        if freeze_encoders:
            for p in vlp.parameters():
                p.requires_grad_(False)
        self.head = AnswerHead(
            vlp.text_encoder.config.hidden_size,
            len(self.answers),
            answer_layers,
            answer_heads,
            image_width=vlp.image_tower.out_dim,
        )

    def train(self, mode: bool = True) -> VQAModel:
        """Train mode for what learns; frozen encoders stay in eval mode."""
        super().train(mode)
        if self.freeze_encoders:
            self.vlp.train(False)  # no dropout, no BatchNorm statistics updates
        elif self.freeze_image_norm:
            # Six questions per image make VQA batches repeat images: re-estimating the
            # pretrained BatchNorm statistics from them shifts the image tokens the
            # pretrained layers expect.
            for module in self.vlp.image_tower.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(False)
        return self

    def logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Answer logits [B, A] for (image, question) pairs."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            image_embeds, _ = self.vlp.encode_image(pixel_values)
            question_states, _ = self.vlp.encode_text(input_ids, attention_mask)
        return self.head(image_embeds, question_states, attention_mask)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Answer logits [B, A] (`vlp.models.objectives.VQAObjective` trains them)."""
        return self.logits(pixel_values, input_ids, attention_mask)

    @torch.no_grad()
    def predict(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[str]:
        """The highest-scoring vocabulary answer of each question."""
        best = self.logits(pixel_values, input_ids, attention_mask).argmax(dim=-1)
        return [self.answers[i] for i in best.tolist()]

    def architecture(self) -> dict[str, int]:
        """What `load` needs besides the weights (stored in the model's task.json)."""
        return {
            "answer_layers": len(self.head.decoder.layers),
            "answer_heads": self.head.decoder.layers[0].self_attn.num_heads,
        }

    def save_head(self, model_dir: Path) -> None:
        """Write the answer decoder weights (safetensors) into a model directory being assembled."""
        from vlp.models.weights import save_weights

        save_weights(self.head, Path(model_dir) / HEAD_FILE)

    @classmethod
    def load(
        cls, vlp: VLPModel, answers: list[str], model_dir: Path, **architecture: int
    ) -> VQAModel:
        """Rebuild a VQAModel from a VLPModel, its answers and `model_dir/answer_head`.

        `architecture` is what `architecture()` returned when the model was saved.
        """
        from vlp.models.weights import load_weights

        path = Path(model_dir) / HEAD_FILE
        if not path.exists():
            raise ConfigError(f"{path}: not found; {model_dir} is not a finetuned VQA model")
        model = cls(vlp, answers, **architecture)
        load_weights(
            model.head, path, vlp.temp.device, f"the answer decoder {architecture or 'defaults'}"
        )
        return model


def architecture_from_info(info: dict[str, Any], where: str | os.PathLike) -> dict[str, int]:
    """The answer-decoder shape a VQA model's task.json records (`VQAModel.architecture`)."""
    arch = {k: info[k] for k in ("answer_layers", "answer_heads") if k in info}
    for key, value in arch.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}/task.json: {key} must be an integer, got {value!r}")
    return arch


def load_vqa_model(vlp: VLPModel, info: dict[str, Any], model_dir: Path) -> VQAModel:
    """The VQAModel of a finetuned model directory, given its task.json `info`."""
    answers = info.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ConfigError(f"{model_dir}/task.json: a VQA model needs a non-empty 'answers' list")
    arch = architecture_from_info(info, model_dir)
    return VQAModel.load(vlp, [str(a) for a in answers], model_dir, **arch)


def make_vqa_collate(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    answers: list[str],
    normalize: Callable[[str], str] = normalize_answer,
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate VQADataset items into {pixel_values, input_ids, attention_mask, targets}."""
    from vlp.data.torch_data import collate_images_and_texts

    index = {a: i for i, a in enumerate(answers)}

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images_and_texts(items, "question", tokenizer, max_length)
        batch["targets"] = soft_targets([it["answers"] for it in items], index, normalize)
        return batch

    return collate
