"""Retrieval: ITC top-k candidates re-ranked by batched ITM, both directions."""

from __future__ import annotations

import torch

from vlp.models.embed import encode_texts
from vlp.tasks.retrieval.ranking import rerank, retrieval_scores, topk_pairs


def test_topk_pairs_lists_each_rows_best_columns() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    rows, cols = topk_pairs(sim, 2)
    assert rows.tolist() == [0, 0, 1, 1]
    assert cols.tolist() == [1, 2, 0, 2]


def test_rerank_scores_topk_in_batches_and_reorders_them() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.5, 0.6, 0.7]])
    calls = []

    def scorer(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(len(r))
        # the ITM head prefers the second-best ITC candidate of row 0
        return torch.where((r == 0) & (c == 1), 5.0, 0.0)

    out = rerank(sim, k=2, score_pairs=scorer, batch_size=3)
    assert calls == [3, 1]  # 4 pairs in batches of 3: no per-pair calls
    assert out[0].argmax().item() == 1
    assert out[1].argsort(descending=True)[:2].tolist() == [3, 2]  # ties keep ITC order
    # outside the top k: below every re-ranked candidate, still in ITC order
    assert out[0, 2] < out[0, :2].min() and out[0, 2] > out[0, 3]


def test_batched_rerank_equals_one_pair_at_a_time(tiny_vlp) -> None:
    model = tiny_vlp.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.randn(3, 3, 32, 32))
    texts = ["a red circle", "a blue square to the left of a green triangle", "is there?", "a"]
    ids, mask, text_feat = encode_texts(model, texts, batch_size=2)
    s = retrieval_scores(
        model, image_embeds, image_feat, ids, mask, text_feat, k=2, batch_size=5, score="vlp"
    )
    # reference: every top-k pair of each direction scored alone, unpadded
    for direction, sim, scores in (("i2t", s.itc, s.i2t), ("t2i", s.itc.t(), s.t2i.t())):
        for q in range(sim.shape[0]):
            for c in sim[q].topk(2).indices.tolist():
                i, t = (q, c) if direction == "i2t" else (c, q)
                n = int(mask[t].sum())
                with torch.no_grad():
                    logit = model.itm_logits(
                        image_embeds[i : i + 1], ids[t : t + 1, :n], mask[t : t + 1, :n]
                    )
                expected = logit[0, 1] - logit[0, 0] + s.itc[i, t] / model.temp
                torch.testing.assert_close(scores[q, c], expected, rtol=1e-4, atol=1e-4)
