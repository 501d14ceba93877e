"""Recall@K for image-text retrieval, VSE++ protocol, computed in chunks.

Similarity is [n_images, n_texts]; each text belongs to one image (`text_to_image`). A query's
rank is 1 + the number of non-matching candidates scoring greater than or equal to its
best-scoring match: ties count against the model, so a collapsed model whose scores are all
equal ranks every ground truth last, not first. Untied rankings are those of VSE++. i2t: an
image's rank is the best rank of any of its texts; t2i: a text's rank is the rank of its image. Recall in percent, median rank as VSE++
(floor of the median 0-based rank, plus one), mean rank 1-based. Images with no text are
distractors for t2i only. NaN and infinite scores are errors.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from vlp.errors import ResultsError

if TYPE_CHECKING:
    import torch

KS = (1, 5, 10)
# Rows/columns compared per step: bounds temporaries to ~chunk x n (bool + float).
_CHUNK_ELEMENTS = 1 << 25


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K, median and mean rank of 1-based ranks."""
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks - 1)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def _check_finite(block: np.ndarray, col_offset: int = 0) -> None:
    """ResultsError naming the first NaN or infinite entry of a column block of the similarity."""
    finite = np.isfinite(block)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        value = block[i, j]
        name = "NaN" if np.isnan(value) else ("+inf" if value > 0 else "-inf")
        raise ResultsError(f"similarity has {name} at [{i}, {col_offset + j}]")


def constant_rows(similarity: np.ndarray | torch.Tensor) -> int:
    """How many images score every text the same (a collapsed model's signature)."""
    sim = _as_numpy(similarity)
    step = max(1, _CHUNK_ELEMENTS // max(1, sim.shape[1]))
    return sum(
        int((block.max(axis=1) == block.min(axis=1)).sum())
        for block in (sim[start : start + step] for start in range(0, sim.shape[0], step))
    )


def _is_tensor(x: object) -> bool:
    # a tensor exists only once torch is loaded: scoring arrays never loads it
    loaded = sys.modules.get("torch")
    return loaded is not None and isinstance(x, loaded.Tensor)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if _is_tensor(x) else np.asarray(x)


def recall_at_k(
    similarity: np.ndarray | torch.Tensor, text_to_image: np.ndarray | torch.Tensor | None = None
) -> dict[str, float]:
    """i2t/t2i R@1/5/10, medr, meanr and rsum of an image x text similarity matrix.

    `text_to_image[j]` is the row of text j's image; by default j // 5 (5 captions per image).
    """
    sim = _as_numpy(similarity)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ResultsError(
            f"similarity must be a non-empty 2-D [images, texts] array, got shape {sim.shape}"
        )
    if not np.issubdtype(sim.dtype, np.floating) and not np.issubdtype(sim.dtype, np.integer):
        raise ResultsError(f"similarity must be numeric, got dtype {sim.dtype}")
    n_images, n_texts = sim.shape
    if text_to_image is None:
        if n_texts != 5 * n_images:
            raise ResultsError(
                f"similarity has {n_images} images and {n_texts} texts; without a text->image "
                "mapping there must be exactly 5 texts per image"
            )
        gt = np.arange(n_texts) // 5
    else:
        gt = text_to_image.cpu().numpy() if _is_tensor(text_to_image) else np.asarray(text_to_image)
        if gt.shape != (n_texts,):
            raise ResultsError(
                f"text->image mapping has shape {gt.shape}, expected ({n_texts},) for {n_texts} texts"
            )
        if not np.issubdtype(gt.dtype, np.integer):
            raise ResultsError(
                f"text->image mapping must hold integer image indices, got {gt.dtype}"
            )
        if gt.min() < 0 or gt.max() >= n_images:
            raise ResultsError(
                f"text->image mapping has index {int(gt.min() if gt.min() < 0 else gt.max())} outside 0..{n_images - 1}"
            )
    cols = np.arange(n_texts)
    gt_score = sim[gt, cols]  # each text's score with its own image
    # A non-finite score would make comparisons meaningless; check chunk-wise, no full copy.
    # t2i: every image scoring >= the text's own image counts, its own image included (+1).
    t2i = np.empty(n_texts, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // n_images)
    for start in range(0, n_texts, step):
        block = sim[:, start : start + step]
        _check_finite(block, col_offset=start)
        t2i[start : start + step] = (block >= gt_score[None, start : start + step]).sum(axis=0)
    # i2t: an image's best text is its highest-scoring own text; its own texts tied with that
    # one are matches, not competitors, so they are taken out of the count.
    best = np.full(n_images, -np.inf)
    np.maximum.at(best, gt, gt_score)
    own_at_best = np.zeros(n_images, dtype=np.int64)
    np.add.at(own_at_best, gt, gt_score >= best[gt])
    has_text = own_at_best > 0
    i2t = np.empty(n_images, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // n_texts)
    for start in range(0, n_images, step):
        block = sim[start : start + step]
        at_least_best = (block >= best[start : start + step, None]).sum(axis=1)
        i2t[start : start + step] = at_least_best - own_at_best[start : start + step] + 1
    out = {**_summary(i2t[has_text], "i2t"), **_summary(t2i, "t2i")}
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS))
    return out


def retrieval_recall(
    text_to_image: np.ndarray | torch.Tensor,
    itc: np.ndarray | torch.Tensor,
    i2t: np.ndarray | torch.Tensor | None = None,
    t2i: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@K of image x text retrieval scores: the one way vlp scores retrieval.

    With only `itc` (contrastive similarities): the keys of `recall_at_k`. With re-ranked
    `i2t` and `t2i` matrices as well: their R@K, ranks and rsum (i2t keys from the
    image-query re-ranking, t2i keys from the text-query one), `mean_R@1`, and the
    ITC-only `itc_*R@K` and `itc_rsum`.
    """
    if i2t is None or t2i is None:
        return recall_at_k(itc, text_to_image)
    ranked_i2t = recall_at_k(i2t, text_to_image)
    ranked_t2i = recall_at_k(t2i, text_to_image)
    metrics = {key: v for key, v in ranked_i2t.items() if key.startswith("i2t_")}
    metrics.update({key: v for key, v in ranked_t2i.items() if key.startswith("t2i_")})
    metrics["rsum"] = sum(metrics[f"{d}_R@{x}"] for d in ("i2t", "t2i") for x in KS)
    metrics["mean_R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    itc_only = recall_at_k(itc, text_to_image)
    metrics.update({f"itc_{key}": v for key, v in itc_only.items() if "R@" in key or key == "rsum"})
    return metrics
