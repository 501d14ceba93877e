"""Batched ITM re-ranking against a per-query loop, as LAVIS/BLIP evaluate retrieval.

Both score the same pairs with the same model: each query's ITC top-k candidates, re-ranked
by ITM log-odds + ITC logit (`vlp.tasks.retrieval.ranking`). The per-query loop runs one
fusion forward per query over its k candidates (LAVIS's `evaluation` loop); vlp batches
the pairs of many queries into each forward. Prints both wall times, their ratio and
whether the recalls are equal:

    python benchmarks/bench_rerank.py [--model models/finetuned/retrieval-pretrained] [--split test]
                                      [--batch-size 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlp.config import load_config
from vlp.metrics.retrieval import recall_at_k
from vlp.models.embed import encode_texts
from vlp.tasks.predictor import load_predictor, split_images
from vlp.tasks.retrieval.ranking import retrieval_scores
from vlp.tasks.retrieval.task import recorded_rerank_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/finetuned/retrieval-pretrained")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=128, help="pairs per batched forward")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each arm (best kept)")
    args = ap.parse_args()
    cfg = load_config(args.params)
    data = Path(cfg.evaluate.data_root or cfg.data.root)
    torch.set_grad_enabled(False)

    predictor = load_predictor(args.model, batch_size=args.batch_size)
    model, k = predictor.model, int(predictor.info["rerank_k"])
    score = recorded_rerank_score(predictor.info, predictor.model_dir)
    pairs, images, pil = split_images(data, args.split, predictor)
    index = {int(i): row for row, i in enumerate(images["image_id"])}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    image_embeds, image_feat = predictor._image_states(pil)
    ids, mask, text_feat = encode_texts(model, [str(c) for c in pairs["caption"]], 256)

    def run(pair_batch: int) -> tuple[float, dict[str, float]]:
        best, scores = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            s = retrieval_scores(
                model, image_embeds, image_feat, ids, mask, text_feat, k, pair_batch, score=score
            )
            best = min(best, time.perf_counter() - t0)
            scores = {
                **{k_: v for k_, v in recall_at_k(s.i2t, text_to_image).items() if "i2t" in k_},
                **{k_: v for k_, v in recall_at_k(s.t2i, text_to_image).items() if "t2i" in k_},
            }
        return best, scores

    per_query_s, per_query = run(k)  # one query's k candidates per fusion forward
    batched_s, batched = run(args.batch_size)
    print(
        json.dumps(
            {
                "images": len(images),
                "texts": len(pairs),
                "rerank_k": k,
                "pairs_per_batched_forward": args.batch_size,
                "per_query_loop_s": round(per_query_s, 2),
                "batched_s": round(batched_s, 2),
                "speedup": round(per_query_s / batched_s, 2),
                "equal_recall": per_query == batched,
                "recall": batched,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
