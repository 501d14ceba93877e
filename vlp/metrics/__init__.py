"""Evaluation metrics equal to the reference tools: COCO captions, VQA v2, VSE++ recall@K.

The functions score plain Python and numpy inputs without loading torch; their
torchmetrics forms, synchronised across processes, are in `vlp.metrics.synced`.
"""

from vlp.metrics.caption import score_captions
from vlp.metrics.retrieval import recall_at_k
from vlp.metrics.vqa import vqa_accuracy

__all__ = ["recall_at_k", "score_captions", "vqa_accuracy"]
