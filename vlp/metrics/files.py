"""Score standard results files (`vlp eval`): COCO captions, VQA v2, similarity matrices."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vlp.errors import ResultsError
from vlp.io import load_json
from vlp.metrics.caption import score_captions
from vlp.metrics.retrieval import constant_rows, recall_at_k
from vlp.metrics.vqa import VQAProtocol, vqa_accuracy


def _load_json(path: Path) -> Any:
    return load_json(path, ResultsError)


def checked_records(
    path: Path, data: Any, key: str | None, fields: dict[str, type | tuple]
) -> list[dict]:
    """The list of records (top level, or under `key`), each checked for `fields` and their types."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ResultsError(f'{path}: expected a JSON object with a "{key}" list')
        data = data[key]
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}: record {i} is not a JSON object")
        for name, typ in fields.items():
            if name not in rec:
                raise ResultsError(f'{path}: record {i} has no "{name}"')
            if typ is int and (not isinstance(rec[name], int) or isinstance(rec[name], bool)):
                # ids: 3.0, "3" and null are refused, not rounded or parsed
                raise ResultsError(f'{path}: record {i} "{name}" {rec[name]!r} is not an integer')
            if not isinstance(rec[name], typ) or isinstance(rec[name], bool):
                raise ResultsError(
                    f'{path}: record {i} "{name}" has the wrong type ({type(rec[name]).__name__})'
                )
    return data


def score_caption_files(results: Path, annotations: Path) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr-D of a COCO results file against COCO caption annotations."""
    res = checked_records(results, _load_json(results), None, {"image_id": int, "caption": str})
    ann = checked_records(
        annotations, _load_json(annotations), "annotations", {"image_id": int, "caption": str}
    )
    if not res:
        raise ResultsError(f"{results}: no results")
    captions: dict[int, str] = {}
    for rec in res:
        if rec["image_id"] in captions:
            raise ResultsError(f"{results}: image_id {rec['image_id']} has more than one result")
        captions[rec["image_id"]] = rec["caption"]
    references: dict[int, list[str]] = {}
    for rec in ann:
        references.setdefault(rec["image_id"], []).append(rec["caption"])
    missing = [i for i in captions if i not in references]
    if missing:
        raise ResultsError(
            f"{results}: image_id {missing[0]} is not in {annotations} ({len(missing)} such images)"
        )
    return score_captions(captions, references)


def score_vqa_files(
    results: Path, questions: Path, annotations: Path, protocol: VQAProtocol = "official"
) -> dict:
    """VQA v2 accuracy (overall, per answer type, per question type) of a results file.

    `protocol`: `official` (the VQA v2 script today) or `lavis` (vlp.metrics.vqa).
    """
    res = checked_records(results, _load_json(results), None, {"question_id": int, "answer": str})
    qs = checked_records(questions, _load_json(questions), "questions", {"question_id": int})
    ann = checked_records(
        annotations,
        _load_json(annotations),
        "annotations",
        {"question_id": int, "answers": list, "answer_type": str, "question_type": str},
    )
    predictions: dict[int, str] = {}
    for rec in res:
        if rec["question_id"] in predictions:
            raise ResultsError(
                f"{results}: question_id {rec['question_id']} has more than one answer"
            )
        predictions[rec["question_id"]] = rec["answer"]
    answers, answer_types, question_types = {}, {}, {}
    for i, rec in enumerate(ann):
        if not all(
            isinstance(a, dict) and isinstance(a.get("answer"), str) for a in rec["answers"]
        ):
            raise ResultsError(
                f'{annotations}: record {i} "answers" must be objects with an "answer" string'
            )
        if not rec["answers"]:
            raise ResultsError(f"{annotations}: question_id {rec['question_id']} has no answers")
        answers[rec["question_id"]] = [a["answer"] for a in rec["answers"]]
        answer_types[rec["question_id"]] = rec["answer_type"]
        question_types[rec["question_id"]] = rec["question_type"]
    question_ids = {rec["question_id"] for rec in qs}
    if question_ids != set(answers):
        odd = sorted(question_ids ^ set(answers))[0]
        raise ResultsError(f"question ids of {questions} and {annotations} differ (e.g. {odd})")
    missing = [q for q in answers if q not in predictions]
    if missing:
        raise ResultsError(
            f"{results}: no answer for question_id {missing[0]} ({len(missing)} questions)"
        )
    extra = [q for q in predictions if q not in answers]
    if extra:
        raise ResultsError(f"{results}: question_id {extra[0]} is not in {annotations}")
    return vqa_accuracy(predictions, answers, answer_types, question_types, protocol)


def _load_npy(path: Path) -> np.ndarray:
    """Array in a .npy file (no pickles), or a ResultsError naming the file."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise ResultsError(f"{path}: file not found") from None
    except (ValueError, OSError) as e:
        raise ResultsError(f"{path}: not a readable .npy array ({e})") from None


def score_retrieval_files(similarity: Path, text_image: Path | None) -> dict[str, Any]:
    """Recall@K of an [images, texts] similarity .npy; text_image .npy maps texts to image rows.

    Rows that score every text the same (a collapsed model) add a `warning` to the result.
    """
    sim = _load_npy(similarity)
    mapping = _load_npy(text_image) if text_image is not None else None
    try:
        scores = recall_at_k(sim, None if mapping is None else np.asarray(mapping))
    except ResultsError as e:
        raise ResultsError(f"{similarity}: {e}") from None
    if not all(math.isfinite(v) for v in scores.values()):
        raise ResultsError(f"{similarity}: scores are not finite")
    constant = constant_rows(sim)
    if constant:
        return {
            **scores,
            "warning": f"{constant} of {sim.shape[0]} images score every text the same "
            "(a collapsed model?); ties rank against the ground truth",
        }
    return scores
