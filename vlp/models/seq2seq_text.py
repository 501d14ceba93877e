"""Text in and out of the generative families (encoder-decoder, t5): tokenizers and targets.

These families write text with a transformers decoder that starts from a start token
(`decoder_start_token_id`) and stops on an end token. Their tokenizers differ in what they
add to a text: vlp's WordPiece wraps it in [CLS] ... [SEP], GPT-2's adds nothing, T5's
appends </s>. `DecoderTokens` records the decoder's start, end and padding ids and which of
them the tokenizer adds itself, so that a tokenised batch (as every collate makes it) becomes
the decoder's targets the same way for all of them (`targets`).

A tokenizer without a padding token (GPT-2) pads with its end-of-text token: no token is
added, so the ids a checkpoint reads and writes stay its own; padding is told apart by the
attention mask, never by its id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlp.errors import ConfigError
from vlp.models.tokenizer import local_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_text_tokenizer(path: str | os.PathLike, key: str) -> PreTrainedTokenizerBase:
    """A tokenizer directory as saved; one without a padding token pads with its end token."""
    from transformers import AutoTokenizer

    p = local_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {p}: {e}") from e
    return with_padding(tok, f"{key} ({p})")


def with_padding(tok: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """`tok` (in place) padding with its end token when it has no padding token (GPT-2)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{where}: the tokenizer has neither a padding nor an end token")
        tok.pad_token = tok.eos_token  # an existing token: the vocabulary is unchanged
    tok.padding_side = "right"
    return tok


@dataclass(frozen=True)
class DecoderTokens:
    """The decoder's start, end and padding ids, and what the tokenizer adds to every text."""

    start: int  # decoder_start_token_id: the first decoder input, never a target
    end: int  # the token every target ends with; generation stops on it
    pad: int
    adds_start: bool  # the tokenizer puts `start` first in every text ([CLS])
    adds_end: bool  # the tokenizer puts `end` last in every text ([SEP], </s>)

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, start: int, end: int, pad: int) -> DecoderTokens:
        """The decoder ids given, and whether `tok` adds them to 'a' itself."""
        ids = tok("a")["input_ids"]
        return cls(start, end, pad, adds_start=ids[0] == start, adds_end=ids[-1] == end)

    @classmethod
    def choose(cls, tok: PreTrainedTokenizerBase) -> DecoderTokens:
        """The ids a from-scratch decoder uses with `tok`: the special tokens it wraps texts
        in if it does ([CLS] ... [SEP]), else its bos (or end) token to start, its end token
        to stop."""
        ids = tok("a")["input_ids"]
        special = set(tok.all_special_ids)
        end = ids[-1] if ids[-1] in special else tok.eos_token_id
        start = ids[0] if ids[0] in special and len(ids) > 1 else tok.bos_token_id
        if start is None:
            start = end
        if end is None:
            raise ConfigError(
                "the tokenizer neither ends texts with a special token nor has an end token "
                f"(eos): a decoder could not learn where a text stops; 'a' is {ids}"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else end
        return cls.of(tok, start, end, pad)

    def targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder targets [B, T'] of a tokenised batch: each text's tokens after the start
        token, then the end token, -100 at padding (ignored by the loss).

        The decoder reads them shifted right behind `start` (transformers'
        `shift_tokens_right`), so position t predicts target t.
        """
        lengths = attention_mask.sum(dim=1)
        ids = input_ids
        if self.adds_start:
            ids, lengths = ids[:, 1:], lengths - 1
        if not self.adds_end:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), self.pad)], dim=1)
            ids = ids.scatter(1, lengths[:, None], self.end)
            lengths = lengths + 1
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        return ids.masked_fill(positions >= lengths[:, None], -100)

    def bodies(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """Each text's tokens without the start and end tokens the tokenizer wraps it in."""
        out = []
        for ids, n in zip(input_ids.tolist(), attention_mask.sum(dim=1).tolist(), strict=True):
            row = ids[:n]
            if self.adds_start:
                row = row[1:]
            if self.adds_end and row and row[-1] == self.end:  # a truncated text has none
                row = row[:-1]
            out.append(row)
        return out

    def prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """What a decoder-only model reads before it answers: start, the prompt, end."""
        return [[self.start, *row, self.end] for row in self.bodies(input_ids, attention_mask)]

    def prompted(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder inputs, targets) [B, T] of `prompts` followed by the answers: the targets
        are each answer's tokens and the end token, -100 on the prompt and the padding."""
        inputs, targets = [], []
        answers = self.bodies(answer_ids, answer_mask)
        for prompt, answer in zip(self.prompts(prompt_ids, prompt_mask), answers, strict=True):
            full = [*prompt, *answer, self.end]
            inputs.append(full[:-1])
            targets.append([-100] * (len(prompt) - 1) + [*answer, self.end])
        width = max(len(row) for row in inputs)
        pad = [row + [self.pad] * (width - len(row)) for row in inputs]
        ignore = [row + [-100] * (width - len(row)) for row in targets]
        device = prompt_ids.device
        return torch.tensor(pad, device=device), torch.tensor(ignore, device=device)
