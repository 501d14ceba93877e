"""Image-text retrieval: ITC top-k candidates re-ranked by ITM, in both directions.

As ALBEF/BLIP: the ITC cosine similarity of every image with every text picks each query's
k best candidates; the fusion encoder then scores only those k pairs per query, in batches
of pairs (one fusion forward per batch, never per pair). How a candidate is scored is the
`rerank_score` (`finetune.retrieval.rerank_score`, `zeroshot.rerank_score`):

- `vlp`: the sum of the two heads' logits, ITM log-odds of "match" (logit 1 - logit 0) plus
  the ITC logit (cosine similarity / learned temperature). On the shapes data BLIP's sum let
  a weak ITM head override a good ITC ranking (docs/design.md, "Retrieval").
- `blip`: BLIP's own evaluation (salesforce/BLIP `train_retrieval.py` `evaluation()`, LAVIS
  `compute_sim_matrix`): the ITM head's raw "match" logit (logit 1) plus the cosine
  similarity. BLIP evaluates with k = 256 on COCO and k = 128 on Flickr30k (`k_test`).

Either way candidates outside the top k keep their ITC order below all of them (BLIP fills
them with -100, all tied): recall@K for K <= k is BLIP's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlp.tasks.retrieval import RerankScore

if TYPE_CHECKING:
    from vlp.models.vlp_model import VLPModel

# Candidates outside a query's top k sit this far below every re-ranked score.
_OUTSIDE_TOPK = 1e4

PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RetrievalScores:
    """Similarity matrices [N_images, N_texts]: plain ITC and ITM-reranked per direction."""

    itc: torch.Tensor
    i2t: torch.Tensor  # rows re-ranked: image queries
    t2i: torch.Tensor  # columns re-ranked: text queries


def topk_pairs(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_idx, text_idx) [Q*k] of every image query's k most ITC-similar texts."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # [Ni, k]
    rows = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)
    return rows, top.reshape(-1)


def rerank(sim: torch.Tensor, k: int, score_pairs: PairScorer, batch_size: int) -> torch.Tensor:
    """Re-rank each row's ITC top-k with `score_pairs(row_idx, col_idx) -> [P]`, batched.

    Returns a matrix of sim's shape: top-k entries = pair score + sim, the rest sim - 1e4.
    Transpose `sim` (and swap the scorer's arguments) to re-rank columns.
    """
    rows, cols = topk_pairs(sim, k)
    scores = torch.empty(rows.shape[0], dtype=sim.dtype, device=sim.device)
    for start in range(0, rows.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        scores[sl] = score_pairs(rows[sl], cols[sl]).to(sim.dtype)
    out = sim - _OUTSIDE_TOPK
    out[rows, cols] = scores + sim[rows, cols]
    return out


@torch.no_grad()
def retrieval_scores(
    model: VLPModel,
    image_embeds: torch.Tensor,
    image_feat: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_feat: torch.Tensor,
    k: int,
    batch_size: int,
    *,
    score: RerankScore,
) -> RetrievalScores:
    """ITC similarity and its ITM re-ranking for image->text and text->image retrieval.

    `k` 0: no re-ranking (a dual encoder has no ITM head); both directions rank by the ITC
    logit. `score`: how a top-k candidate is scored (`vlp` or `blip`, see the module).
    """
    sim = image_feat @ text_feat.t()
    itc_logits = sim / model.temp.detach()
    if k == 0:
        return RetrievalScores(itc=sim, i2t=itc_logits, t2i=itc_logits)
    blip = score == "blip"
    base = sim if blip else itc_logits  # what the ITM score is added to

    def image_text(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        # Trim the pair batch to its longest text: padding columns cost fusion time.
        mask = attention_mask[txt_idx]
        t = int(mask.sum(dim=1).max())
        logits = model.itm_logits(image_embeds[img_idx], input_ids[txt_idx, :t], mask[:, :t])
        return (logits[:, 1] if blip else logits[:, 1] - logits[:, 0]).float()

    i2t = rerank(base, k, image_text, batch_size)
    t2i = rerank(base.t().contiguous(), k, lambda t, i: image_text(i, t), batch_size).t()
    return RetrievalScores(itc=sim, i2t=i2t, t2i=t2i.contiguous())
