"""VQA accuracy follows the official VQA v2 script (and, as `lavis`, its earlier revision).

Every expected value is derived by hand from the scripts' text: GT-Vision-Lab/VQA vqaEval.py
at "Fixed processing answers bug" (`official`) and LAVIS's vqa_eval.py (`lavis`).
"""

from __future__ import annotations

import pytest
import torch

from vlp.config import VQA_PROTOCOLS
from vlp.errors import ResultsError
from vlp.metrics.synced import VQAAccuracy
from vlp.metrics.vqa import (
    PROTOCOLS,
    compared_answers,
    normalize_answer,
    question_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  yes\n", "yes"),  # whitespace clean-up
        ("Two", "2"),  # lower-case, number word
        ("none", "0"),  # the script maps "none" to 0 too
        ("the red one", "red 1"),  # articles dropped
        ("dont", "don't"),  # contraction restored
        ("Im", "im"),  # lower-casing happens first, so the table's "Im" never applies
        ("1,000", "1000"),  # comma between digits: every mark deleted, not spaced
        ("red,blue", "red blue"),  # mark not touching a space: becomes a space
        ("red, blue", "red blue"),  # mark touching a space: deleted
        ("black/white", "black white"),
        ("yes.", "yes"),  # period not followed by a digit: deleted
        ("2.5", "2.5"),  # period before a digit: kept
        ("man's", "man's"),  # apostrophe is not in the script's list
        ("left: right", "left: right"),  # neither is the colon
        ("a" + "." * 40, "a" + "." * 8),  # only 32 periods go (re.UNICODE passed as count)
    ],
)
def test_full_normalisation(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_official_normalises_both_sides_only_when_answers_differ() -> None:
    # unanimous (after whitespace clean-up): nothing else on either side
    assert compared_answers(" Yes.\n", ["yes"] * 10) == ("Yes.", ["yes"] * 10)
    assert compared_answers("yes", ["yes\t"] * 5 + ["yes"] * 5) == ("yes", ["yes"] * 10)
    # not unanimous: punctuation, then digits/articles, on every answer and the prediction
    assert compared_answers("Two.", ["Two", "the two!", "3"]) == ("2", ["2", "2", "3"])


def test_lavis_normalises_prediction_always_ground_truth_punctuation_only() -> None:
    assert compared_answers(" Yes.\n", ["yes"] * 10, "lavis") == ("yes", ["yes"] * 10)
    assert compared_answers("x", ["yes!", "no."], "lavis") == ("x", ["yes ", "no"])
    assert compared_answers("x", ["Two", "two"], "lavis") == (
        "x",
        ["Two", "two"],
    )  # no lower-casing
    assert compared_answers("x", ["yes\t"] * 10, "lavis") == ("x", ["yes\t"] * 10)  # raw


def test_protocol_names_agree_with_config_and_unknown_is_refused() -> None:
    assert PROTOCOLS == VQA_PROTOCOLS == ("official", "lavis")
    with pytest.raises(ValueError, match="unknown VQA protocol 'blip'"):
        question_accuracy("yes", ["yes"] * 10, "blip")
    with pytest.raises(ValueError, match="unknown VQA protocol"):
        VQAAccuracy(protocol="blip")
    with pytest.raises(ValueError, match="unknown VQA protocol"):
        vqa_accuracy({1: "yes"}, {1: ["yes"] * 10}, protocol="blip")


@pytest.mark.parametrize(
    ("pred", "answers", "official", "lavis"),
    [
        # unanimous ground truth, unnormalised prediction: official compares them raw
        ("yes", ["yes"] * 10, 1.0, 1.0),
        ("Yes", ["yes"] * 10, 0.0, 1.0),  # case
        ("yes.", ["yes"] * 10, 0.0, 1.0),  # trailing period
        ("three", ["3"] * 10, 0.0, 1.0),  # number word
        ("the dog", ["dog"] * 10, 0.0, 1.0),  # article
        ("two", ["Two"] * 10, 0.0, 0.0),  # lavis never lower-cases the ground truth
        ("3.", ["3"] * 10, 0.0, 1.0),  # period not before a digit
        (" yes\n", ["yes"] * 10, 1.0, 1.0),  # whitespace is cleaned in both
        ("yes", ["yes\t"] * 10, 1.0, 0.0),  # official cleans the ground truth too; lavis does not
        # unanimous only after whitespace clean-up: official leaves them raw, lavis sees 2 answers
        # and punctuation keeps "yes " (2 * 1/3 + 8 * 2/3) / 10
        ("yes", ["yes"] * 2 + ["yes "] * 8, 1.0, 0.6),
        # the soft score: min(1, others matching / 3) averaged over the 10 annotators
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0, 1.0),
        ("yes", ["yes"] + ["no"] * 9, 0.3, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        # non-unanimous ground truth with number words and punctuation
        # official: "two" -> "2" (4), "2" (3), "three" -> "3": 7 match "2"; every annotator >= 3
        # lavis: punctuation only, 3 match: (3 * 2/3 + 7 * 1) / 10
        ("2", ["two"] * 4 + ["2"] * 3 + ["three"] * 3, 1.0, 0.9),
        # official: "yes!" -> "yes " -> "yes", "Yes!" -> "yes": 3 match; lavis: GT "yes " never does
        ("Yes!", ["yes!"] * 3 + ["no"] * 7, 0.9, 0.0),
        ("a Dog", ["dog"] * 3 + ["the dog"] * 3 + ["cat"] * 4, 1.0, 0.9),  # lavis: 3 of "dog"
        # comma between two digits: every mark is deleted, not spaced
        ("1,000", ["1000"] * 3 + ["1,000"] * 7, 1.0, 1.0),
        ("1,000", ["1,000"] * 10, 1.0, 0.0),  # lavis: "1000" vs raw "1,000"
        ("1000", ["1,000"] * 10, 0.0, 0.0),
        ("1,000", ["1000"] * 10, 0.0, 1.0),
        # a mark touching a space is deleted, otherwise spaced: "red,blue" -> "red blue"
        ("red blue", ["red,blue"] * 5 + ["red, blue"] * 5, 1.0, 1.0),
        ("red blue", ["red,blue"] * 10, 0.0, 0.0),
        # a period before a digit stays, any other goes
        ("2.5", ["2.5"] * 5 + ["2"] * 5, 1.0, 1.0),  # 5 match: every annotator has >= 4 others
        ("2.5.", ["2.5"] * 3 + ["3"] * 7, 0.9, 0.9),
    ],
)
def test_question_accuracy(pred: str, answers: list[str], official: float, lavis: float) -> None:
    assert question_accuracy(pred, answers) == pytest.approx(official)
    assert question_accuracy(pred, answers, "official") == pytest.approx(official)
    assert question_accuracy(pred, answers, "lavis") == pytest.approx(lavis)


def test_aggregates_round_to_two_decimals() -> None:
    answers = {1: ["2"] * 10, 2: ["yes"] * 2 + ["no"] * 8, 3: ["red"] * 10}
    results = {1: "two", 2: "yes", 3: "blue"}
    types = {1: "number", 2: "yes/no", 3: "other"}
    qtypes = {1: "how many", 2: "is the", 3: "is the"}
    assert vqa_accuracy(results, answers, types, qtypes) == {
        "overall": 20.0,  # 100 * (0 + 0.6 + 0) / 3: "two" is compared raw with ten "2"
        "perAnswerType": {"number": 0.0, "yes/no": 60.0, "other": 0.0},
        "perQuestionType": {"how many": 0.0, "is the": 30.0},
    }
    out = vqa_accuracy(results, answers, types, qtypes, protocol="lavis")
    assert out == {
        "overall": 53.33,  # 100 * (1 + 0.6 + 0) / 3
        "perAnswerType": {"number": 100.0, "yes/no": 60.0, "other": 0.0},
        "perQuestionType": {"how many": 100.0, "is the": 30.0},
    }


def test_results_must_cover_exactly_the_questions() -> None:
    with pytest.raises(ResultsError, match="no answer for question_id 2"):
        vqa_accuracy({1: "yes"}, {1: ["yes"], 2: ["no"]})
    with pytest.raises(ResultsError, match="question_id 3 is not in"):
        vqa_accuracy({1: "yes", 3: "no"}, {1: ["yes"]})


def test_metric_accumulates_resets_and_merges() -> None:
    metric = VQAAccuracy(protocol="lavis")
    metric.update(["two"], [["2"] * 10], ["number"], ["how many"])
    metric.update(
        ["yes", "blue"],
        [["yes"] * 2 + ["no"] * 8, ["red"] * 10],
        ["yes/no", "other"],
        ["is the"] * 2,
    )
    assert metric.compute()["overall"] == 53.33
    # "cat" sync concatenates each state across processes; do the same with a second metric.
    other = VQAAccuracy(protocol="lavis")
    other.update(["red"], [["red"] * 10], ["other"], ["what color"])
    merged = VQAAccuracy(protocol="lavis")
    for name in ("accuracy", "answer_type_bytes", "question_type_bytes"):
        setattr(merged, name, [torch.cat([*getattr(metric, name), *getattr(other, name)])])
    merged._update_count = 1
    assert merged.compute()["perAnswerType"] == {"number": 100.0, "yes/no": 60.0, "other": 50.0}
    metric.reset()
    metric.update(["no"], [["no"] * 10])
    assert metric.compute() == {
        "overall": 100.0,
        "perAnswerType": {"all": 100.0},
        "perQuestionType": {"all": 100.0},
    }


def test_metric_default_is_the_official_protocol() -> None:
    metric = VQAAccuracy()
    metric.update(["two", "Yes!"], [["2"] * 10, ["yes!"] * 3 + ["no"] * 7])
    assert metric.compute()["overall"] == 45.0  # (0 + 0.9) / 2
