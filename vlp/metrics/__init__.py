"""Evaluation metrics equal to the reference tools: COCO captions, VQA v2, VSE++ recall@K."""

from vlp.metrics.caption import CaptionMetrics, score_captions
from vlp.metrics.retrieval import RetrievalRecall, recall_at_k
from vlp.metrics.vqa import VQAAccuracy, vqa_accuracy

__all__ = [
    "CaptionMetrics",
    "RetrievalRecall",
    "VQAAccuracy",
    "recall_at_k",
    "score_captions",
    "vqa_accuracy",
]
