"""VQA accuracy follows the official VQA v2 script; expected values derived by hand from its rules."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ResultsError
from vlp.metrics.vqa import (
    VQAAccuracy,
    normalize_ground_truth,
    normalize_prediction,
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
def test_prediction_normalisation(raw: str, expected: str) -> None:
    assert normalize_prediction(raw) == expected


def test_ground_truth_only_gets_punctuation_and_only_when_answers_differ() -> None:
    assert normalize_ground_truth(["Two"] * 10) == ["Two"] * 10
    assert normalize_ground_truth(["yes!", "no."]) == ["yes ", "no"]
    assert normalize_ground_truth(["Two", "two"]) == ["Two", "two"]  # no lower-casing


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("yes", ["yes"] * 10, 1.0),
        ("Two", ["2"] * 10, 1.0),
        ("two", ["Two"] * 10, 0.0),  # identical GT is left raw: "2" != "Two"
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
        ("yes", ["yes"] + ["no"] * 9, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        ("yes", ["yes!"] * 3 + ["no"] * 7, 0.0),  # GT "yes!" becomes "yes " and never matches
        ("1,000", ["1000"] * 3 + ["1,000"] * 7, 1.0),  # GT "1,000" -> "1000" too: 10 match
    ],
)
def test_question_accuracy(pred: str, answers: list[str], expected: float) -> None:
    assert question_accuracy(pred, answers) == pytest.approx(expected)


def test_aggregates_round_to_two_decimals() -> None:
    answers = {1: ["2"] * 10, 2: ["yes"] * 2 + ["no"] * 8, 3: ["red"] * 10}
    results = {1: "two", 2: "yes", 3: "blue"}
    types = {1: "number", 2: "yes/no", 3: "other"}
    qtypes = {1: "how many", 2: "is the", 3: "is the"}
    out = vqa_accuracy(results, answers, types, qtypes)
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
    metric = VQAAccuracy()
    metric.update(["two"], [["2"] * 10], ["number"], ["how many"])
    metric.update(
        ["yes", "blue"],
        [["yes"] * 2 + ["no"] * 8, ["red"] * 10],
        ["yes/no", "other"],
        ["is the"] * 2,
    )
    assert metric.compute()["overall"] == 53.33
    # "cat" sync concatenates each state across processes; do the same with a second metric.
    other = VQAAccuracy()
    other.update(["red"], [["red"] * 10], ["other"], ["what color"])
    merged = VQAAccuracy()
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
