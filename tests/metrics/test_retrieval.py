"""Recall@K follows the VSE++ protocol, chunked, with ties counted against the ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.errors import ResultsError
from vlp.metrics import retrieval
from vlp.metrics.retrieval import recall_at_k
from vlp.metrics.synced import RetrievalRecall


def _vse_reference(sim: np.ndarray) -> dict[str, float]:
    """The VSE++ evaluation loop (argsort per query, 5 texts per image)."""
    n = sim.shape[0]
    i2t = np.array(
        [
            min(np.where(np.argsort(sim[i])[::-1] == k)[0][0] for k in range(5 * i, 5 * i + 5))
            for i in range(n)
        ]
    )
    t2i = np.array([np.where(np.argsort(sim[:, j])[::-1] == j // 5)[0][0] for j in range(5 * n)])
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    return out


def test_equals_vse_loop_on_random_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = np.random.default_rng(0).standard_normal((24, 120)) + np.repeat(np.eye(24), 5, axis=1)
    expected = _vse_reference(sim)
    got = recall_at_k(sim)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 7)  # many tiny chunks, same answer
    assert recall_at_k(sim) == got
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["rsum"] == pytest.approx(sum(v for k, v in expected.items() if "_R@" in k))


def test_hand_case_with_custom_mapping_and_ties() -> None:
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2.
    sim = np.array(
        [
            [0.1, 0.9, 0.5, 0.2],  # image 0: best own text (0.9) ranks 1
            [0.3, 0.0, 0.2, 0.2],  # image 1: own 0.2 beaten by 0.3, tied by text 3 -> rank 3
            [0.9, 0.9, 0.9, 0.1],  # image 2: own 0.1 beaten by 3 texts -> rank 4
        ]
    )
    out = recall_at_k(sim, np.array([0, 0, 1, 2]))
    # i2t ranks [1, 3, 4]; t2i ranks: text0 3 (0.3, 0.9 >= 0.1), text1 2 (image 2 ties 0.9),
    # text2 3, text3 3 (both other images tie or beat 0.1)
    assert out["i2t_R@1"] == pytest.approx(100 / 3)
    assert out["i2t_R@5"] == 100.0
    assert out["i2t_medr"] == 3.0
    assert out["i2t_meanr"] == pytest.approx(8 / 3)
    assert out["t2i_R@1"] == 0.0
    assert out["t2i_R@5"] == 100.0
    assert out["t2i_meanr"] == pytest.approx((3 + 2 + 3 + 3) / 4)
    assert out["t2i_medr"] == 3.0


def test_own_texts_tied_at_the_best_do_not_compete() -> None:
    sim = np.array(
        [
            [0.7, 0.7, 0.2],  # image 0: both own texts at 0.7, nothing else reaches it -> rank 1
            [0.4, 0.3, 0.4],  # image 1: own text 2 (0.4) tied by text 0 -> rank 2
        ]
    )
    out = recall_at_k(sim, np.array([0, 0, 1]))
    assert out["i2t_R@1"] == 50.0 and out["i2t_meanr"] == 1.5


@pytest.mark.parametrize("shape", [(4, 20), (100, 500)])
def test_all_equal_scores_rank_last(shape: tuple[int, int]) -> None:
    n_images, n_texts = shape
    for value in (0.0, 1.0, -2.5):
        out = recall_at_k(np.full(shape, value))
        assert out["i2t_R@1"] == out["t2i_R@1"] == 0.0
        assert out["i2t_medr"] == n_texts - 5 + 1  # behind every other image's texts
        assert out["t2i_medr"] == n_images


def test_untied_scores_rank_as_before_ties_counted() -> None:
    """Without ties, >= and > give the same ranks: the VSE++ results are unchanged."""
    sim = np.random.default_rng(3).standard_normal((30, 150))
    out = recall_at_k(sim)
    strict_i2t = [1 + int((sim[i] > sim[i, 5 * i : 5 * i + 5].max()).sum()) for i in range(30)]
    strict_t2i = [1 + int((sim[:, j] > sim[j // 5, j]).sum()) for j in range(150)]
    assert out["i2t_meanr"] == pytest.approx(np.mean(strict_i2t))
    assert out["t2i_meanr"] == pytest.approx(np.mean(strict_t2i))


def test_constant_rows_are_counted() -> None:
    sim = np.random.default_rng(0).standard_normal((6, 30))
    assert retrieval.constant_rows(sim) == 0
    sim[[1, 4]] = 0.25
    assert retrieval.constant_rows(sim) == 2
    assert retrieval.constant_rows(torch.zeros(3, 15)) == 3


@pytest.mark.parametrize(
    ("sim", "mapping", "message"),
    [
        (np.zeros((2, 9)), None, "exactly 5 texts per image"),
        (np.zeros(10), None, "2-D"),
        (np.zeros((2, 3)), np.array([0, 1]), r"expected \(3,\)"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), "outside 0..1"),
        (np.full((1, 5), np.nan), None, r"NaN at \[0, 0\]"),
        (np.full((1, 5), np.inf), None, r"\+inf at \[0, 0\]"),
        (np.array([[0.0, 1, 2, 3, -np.inf]]), None, r"-inf at \[0, 4\]"),
    ],
)
def test_bad_input_is_named(sim, mapping, message) -> None:
    with pytest.raises(ResultsError, match=message):
        recall_at_k(sim, mapping)


def test_metric_deduplicates_images_and_matches_function() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 8, generator=gen)
    texts = images.repeat_interleave(5, dim=0) + 0.8 * torch.randn(30, 8, generator=gen)
    metric = RetrievalRecall()
    for start in range(0, 30, 7):  # pair batches: each text comes with (a copy of) its image
        rows = torch.arange(start, min(start + 7, 30)) // 5
        metric.update(images[rows], rows + 100, texts[start : start + 7], rows + 100)
    assert metric.compute() == recall_at_k(images @ texts.T)
    metric.reset()
    metric.update(images[:1], torch.tensor([1]), texts[:1], torch.tensor([2]))
    with pytest.raises(ResultsError, match="no image embedding"):
        metric.compute()


def test_retrieval_recall_is_recall_at_k_of_itc_or_of_each_reranked_direction():
    """The one recall@K of retrieval scores: ITC alone, or re-ranked i2t/t2i plus `itc_*`."""
    from vlp.metrics.retrieval import retrieval_recall

    rng = np.random.default_rng(0)
    itc, i2t, t2i = (rng.standard_normal((4, 20)).astype(np.float32) for _ in range(3))
    gt = np.arange(20) // 5
    assert retrieval_recall(gt, itc) == recall_at_k(itc, gt)
    got = retrieval_recall(gt, torch.from_numpy(itc), torch.from_numpy(i2t), torch.from_numpy(t2i))
    by_i2t, by_t2i, by_itc = recall_at_k(i2t, gt), recall_at_k(t2i, gt), recall_at_k(itc, gt)
    for k in (1, 5, 10):
        assert got[f"i2t_R@{k}"] == by_i2t[f"i2t_R@{k}"]
        assert got[f"t2i_R@{k}"] == by_t2i[f"t2i_R@{k}"]
        assert got[f"itc_i2t_R@{k}"] == by_itc[f"i2t_R@{k}"]
    assert got["mean_R@1"] == (by_i2t["i2t_R@1"] + by_t2i["t2i_R@1"]) / 2
    assert got["itc_rsum"] == by_itc["rsum"]
