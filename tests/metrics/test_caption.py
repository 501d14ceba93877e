"""Caption metrics equal the MS-COCO caption toolkit's official scores."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ResultsError
from vlp.metrics.caption import CAPTION_KEYS, score_captions, score_tokenized
from vlp.metrics.ptb import tokenize_caption
from vlp.metrics.synced import CaptionMetrics


def test_corpus_scores_equal_official(coco_captions) -> None:
    results, references, official = coco_captions
    scores = score_captions(results, references)
    assert set(scores) == set(CAPTION_KEYS)
    for key in CAPTION_KEYS:
        assert scores[key] == pytest.approx(official["corpus"][key], abs=1e-6), key


def test_per_image_scores_equal_official(coco_captions) -> None:
    results, references, official = coco_captions
    ids = list(results)
    hyps = [tokenize_caption(results[i]) for i in ids]
    refs = [[tokenize_caption(r) for r in references[i]] for i in ids]
    _, rows = score_tokenized(hyps, refs, per_image=True)
    by_id = dict(zip(ids, rows, strict=True))
    assert len(official["per_image"]) == 1000
    for expected in official["per_image"]:
        got = by_id[expected["image_id"]]
        for key in CAPTION_KEYS:
            assert got[key] == pytest.approx(expected[key], abs=1e-9), (expected["image_id"], key)


def test_dict_fallback_for_huge_vocabularies_gives_the_same_scores(
    coco_captions, monkeypatch
) -> None:
    from vlp.metrics import caption

    results, references, official = coco_captions
    monkeypatch.setattr(caption, "_ngram_entries", lambda hyps, refs: None)
    scores = score_captions(results, references)
    for key in CAPTION_KEYS:  # BLEU and CIDEr-D both count n-grams from the entries
        assert scores[key] == pytest.approx(official["corpus"][key], abs=1e-6), key


def test_perfect_caption_and_empty_caption() -> None:
    refs = {1: ["a red car on a road", "a car that is red"], 2: ["two dogs play in snow"]}
    perfect = score_captions({1: "a red car on a road", 2: "two dogs play in snow"}, refs)
    assert perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE_L"] == pytest.approx(1.0)
    empty = score_captions({1: "", 2: "..."}, refs)
    assert empty["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert empty["CIDEr"] == 0.0


def test_missing_references_is_an_error() -> None:
    with pytest.raises(ResultsError, match="image_id 7"):
        score_captions({7: "a cat"}, {1: ["a cat"]})


def test_metric_accumulates_and_resets(coco_captions) -> None:
    results, references, official = coco_captions
    ids = list(results)
    metric = CaptionMetrics()
    for start in range(0, len(ids), 300):
        batch = ids[start : start + 300]
        metric.update([results[i] for i in batch], [references[i] for i in batch])
    scores = metric.compute()
    assert scores["CIDEr"] == pytest.approx(official["corpus"]["CIDEr"], abs=1e-6)
    assert scores["Bleu_4"] == pytest.approx(official["corpus"]["Bleu_4"], abs=1e-6)
    metric.reset()
    metric.update(["a red car"], [["a red car"]])
    assert metric.compute()["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_state_is_tensors_that_merge_like_sync(coco_captions) -> None:
    """Concatenating two processes' states (what DDP "cat" sync does) gives the global score."""
    results, references, official = coco_captions
    ids = list(results)
    parts = [CaptionMetrics(), CaptionMetrics()]
    for rank, part in enumerate(parts):
        mine = ids[rank::2]
        part.update([results[i] for i in mine], [references[i] for i in mine])
    merged = CaptionMetrics()
    for name in ("hyp_bytes", "ref_bytes", "refs_per_caption"):
        states = [torch.cat(getattr(p, name)) for p in parts]
        assert all(s.dtype in (torch.uint8, torch.long) for s in states)
        setattr(merged, name, [torch.cat(states)])
    merged._update_count = 1
    assert merged.compute()["CIDEr"] == pytest.approx(official["corpus"]["CIDEr"], abs=1e-6)
