"""VQA by ranking candidate answers with BLIP's answer decoder, as BLIP answers for the VQA v2
leaderboard (salesforce/BLIP `models/blip_vqa.py` `rank_answer`, `inference='rank'`).

For each question, fused with its image ([ENC] first): the decoder's first-token
distribution after [DEC] picks the k candidates whose first token is most probable; each of
those is scored by the sum over its tokens of the decoder's (label-smoothed, as BLIP's)
cross-entropy, and the lowest wins. The decoder reads the question's unpadded positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.models.vlp_model import VLPModel


def read_candidates(path: str | Path, key: str = "--answers") -> list[str]:
    """Candidate answers from a JSON list of strings (BLIP's `answer_list.json`)."""
    try:
        answers = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {path}: cannot read a JSON list of answers ({e})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{key} {path}: must be a non-empty JSON list of answer strings")
    return answers


@torch.no_grad()
def rank_answers(
    model: VLPModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    candidates: Sequence[str],
    k: int,
) -> list[str]:
    """The best of `candidates` for each (image, question), BLIP's way (see the module)."""
    if k < 1:
        raise ConfigError(f"zeroshot.answer_rank_k: must be >= 1, got {k}")
    states = model.question_states(pixel_values, input_ids, attention_mask)
    n = states.shape[0]
    enc = model.tokenizer(list(candidates), padding="longest", return_tensors="pt")
    answer_ids = enc["input_ids"].to(states.device)
    answer_ids[:, 0] = model.dec_token_id
    answer_mask = enc["attention_mask"].to(states.device)

    start = answer_ids[:1, :1].repeat(n, 1)
    first = model.text_decoder(
        input_ids=start,
        encoder_hidden_states=states,
        encoder_attention_mask=attention_mask,
        use_cache=False,
    ).logits[:, 0]
    probs = first.softmax(dim=-1).index_select(1, answer_ids[:, 1])
    k = min(k, len(candidates))
    top = probs.topk(k, dim=1).indices  # [n, k]

    ids, mask = answer_ids[top.reshape(-1)], answer_mask[top.reshape(-1)]
    loss = model.text_decoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=states.repeat_interleave(k, dim=0),
        encoder_attention_mask=attention_mask.repeat_interleave(k, dim=0),
        labels=ids.masked_fill(mask == 0, -100),
        reduction="none",
        use_cache=False,
    ).loss  # per candidate: summed over its tokens
    best = (-loss).view(n, k).argmax(dim=1)
    return [candidates[i] for i in top[torch.arange(n), best].tolist()]
