"""Zero-shot scores in CLIP_benchmark's result layout (LAION-AI/CLIP_benchmark, `cli.py`).

One JSON object per run: `dataset`, `model`, `pretrained`, `task`
(`zeroshot_classification` or `zeroshot_retrieval`), `metrics` and `language`. Its metrics
are fractions in [0, 1], not percent: classification `acc1`, `acc5` (null with fewer than 5
classes) and `mean_per_class_recall` (balanced accuracy); retrieval
`image_retrieval_recall@K` (a caption finds its image: vlp's t2i) and
`text_retrieval_recall@K` (an image finds one of its captions: vlp's i2t), K = 1, 5, 10.
"""

from __future__ import annotations

from typing import Any

from vlp.metrics.retrieval import KS

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


def clip_benchmark_metrics(scores: dict[str, float], task: str) -> dict[str, float | None]:
    """vlp's zero-shot scores (percent) as CLIP_benchmark's metrics (fractions)."""
    if task == CLASSIFICATION:
        return {
            "acc1": scores["top1_accuracy"] / 100.0,
            "acc5": scores["top5_accuracy"] / 100.0 if scores["n_classes"] >= 5 else None,
            "mean_per_class_recall": scores["mean_per_class_recall"] / 100.0,
        }
    metrics: dict[str, float | None] = {}
    for k in KS:
        metrics[f"image_retrieval_recall@{k}"] = scores[f"t2i_R@{k}"] / 100.0
        metrics[f"text_retrieval_recall@{k}"] = scores[f"i2t_R@{k}"] / 100.0
    return metrics


def clip_benchmark_record(
    scores: dict[str, float], task: str, dataset: str, model: str, pretrained: str
) -> dict[str, Any]:
    """The result object CLIP_benchmark writes for one model on one dataset and task."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": clip_benchmark_metrics(scores, task),
        "language": "en",
    }
