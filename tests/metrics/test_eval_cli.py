"""`vlp eval captions|vqa|retrieval`: JSON out, clear errors and non-zero exit on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlp.cli import main

REPO = Path(__file__).resolve().parents[2]


def _eval(*args: str) -> int:
    return main(["--params", str(REPO / "params.yaml"), "eval", *args])


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_captions_conformance_via_cli(coco_conformance: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores.json"
    rc = _eval(
        "captions",
        "--results", str(coco_conformance / "captions_val2014_fakecap_results.json"),
        "--annotations", str(coco_conformance / "captions_val2014_subset.json"),
        "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    official = json.loads((coco_conformance / "official_scores.json").read_text())["corpus"]
    for key, value in printed.items():
        assert value == pytest.approx(official[key], abs=1e-6)
    assert json.loads(out.read_text()) == printed


@pytest.fixture
def caption_files(tmp_path: Path) -> tuple[Path, Path]:
    ann = {
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "A red car."},
            {"image_id": 2, "id": 2, "caption": "A dog."},
        ]
    }
    return tmp_path / "res.json", _write(tmp_path / "ann.json", ann)


@pytest.mark.parametrize(
    ("results", "message"),
    [
        (
            [{"image_id": 1, "caption": "a car"}, {"image_id": 1, "caption": "a red car"}],
            "image_id 1 has more than one result",
        ),
        ([{"image_id": 3, "caption": "a car"}], "image_id 3 is not in"),
        ([{"image_id": 1}], 'record 0 has no "caption"'),
        ({"image_id": 1}, "expected a JSON list"),
    ],
)
def test_bad_caption_results(caption_files, results, message, capsys) -> None:
    res, ann = caption_files
    _write(res, results)
    assert _eval("captions", "--results", str(res), "--annotations", str(ann)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unparsable_json_names_the_file(caption_files, capsys) -> None:
    res, ann = caption_files
    res.write_text('[{"image_id": 1, "caption": ')
    assert _eval("captions", "--results", str(res), "--annotations", str(ann)) == 2
    assert f"{res}: not valid JSON" in capsys.readouterr().err


@pytest.fixture
def vqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    def ann(qid: int, answers: list[str], atype: str, qtype: str) -> dict:
        return {
            "question_id": qid, "image_id": 9, "answer_type": atype, "question_type": qtype,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        }  # fmt: skip

    questions = {"questions": [{"question_id": q, "image_id": 9, "question": "?"} for q in (1, 2)]}
    annotations = {
        "annotations": [
            ann(1, ["2"] * 10, "number", "how many"),
            ann(2, ["yes"] * 2 + ["no"] * 8, "yes/no", "is the"),
        ]
    }
    return (
        tmp_path / "res.json",
        _write(tmp_path / "q.json", questions),
        _write(tmp_path / "a.json", annotations),
    )


@pytest.mark.parametrize(
    ("protocol", "number"),
    [
        ([], 0.0),  # official (default): "two" is compared raw against ten identical "2"
        (["--protocol", "official"], 0.0),
        (["--protocol", "lavis"], 100.0),  # the prediction is always normalised: "2"
    ],
)
def test_vqa_via_cli(vqa_files, protocol: list[str], number: float, capsys) -> None:
    res, q, a = vqa_files
    _write(res, [{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "yes"}])
    args = ["--results", str(res), "--questions", str(q), "--annotations", str(a), *protocol]
    assert _eval("vqa", *args) == 0
    assert json.loads(capsys.readouterr().out) == {
        "overall": (number + 60.0) / 2,
        "perAnswerType": {"number": number, "yes/no": 60.0},
        "perQuestionType": {"how many": number, "is the": 60.0},
    }


def test_vqa_unknown_protocol_is_refused(vqa_files, capsys) -> None:
    res, q, a = vqa_files
    args = ["--results", str(res), "--questions", str(q), "--annotations", str(a)]
    with pytest.raises(SystemExit) as exc:
        _eval("vqa", *args, "--protocol", "blip")
    assert exc.value.code == 2
    assert "invalid choice: 'blip'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([{"question_id": 1, "answer": "two"}], "no answer for question_id 2"),
        (
            [
                {"question_id": 1, "answer": "2"},
                {"question_id": 2, "answer": "y"},
                {"question_id": 5, "answer": "y"},
            ],
            "question_id 5 is not in",
        ),
        (
            [{"question_id": 1, "answer": "2"}, {"question_id": 1, "answer": "3"}],
            "question_id 1 has more than one answer",
        ),
    ],
)
def test_bad_vqa_results(vqa_files, results, message, capsys) -> None:
    res, q, a = vqa_files
    _write(res, results)
    assert _eval("vqa", "--results", str(res), "--questions", str(q), "--annotations", str(a)) == 2
    assert message in capsys.readouterr().err


def test_vqa_questions_and_annotations_must_match(vqa_files, capsys) -> None:
    res, q, a = vqa_files
    _write(q, {"questions": [{"question_id": 1, "image_id": 9, "question": "?"}]})
    _write(res, [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "y"}])
    assert _eval("vqa", "--results", str(res), "--questions", str(q), "--annotations", str(a)) == 2
    assert "question ids of" in capsys.readouterr().err


def test_retrieval_via_cli(tmp_path: Path, capsys) -> None:
    sim = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    mapping = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    np.save(tmp_path / "s.npy", sim)
    np.save(tmp_path / "t.npy", mapping)
    assert (
        _eval(
            "retrieval",
            "--similarity",
            str(tmp_path / "s.npy"),
            "--text-image",
            str(tmp_path / "t.npy"),
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert list(printed)[0] == "i2t_R@1" and "rsum" in printed
    from vlp.metrics.retrieval import recall_at_k

    assert printed == pytest.approx(recall_at_k(sim, mapping))


@pytest.mark.parametrize(
    ("sim", "message"),
    [
        (np.zeros((2, 7), np.float32), "5 texts per image"),
        (np.full((1, 5), np.nan), "NaN at [0, 0]"),
        (np.full((100, 500), np.inf), "+inf at [0, 0]"),
        (np.concatenate([np.zeros((1, 10)), np.full((1, 10), -np.inf)]), "-inf at [1, 0]"),
    ],
)
def test_bad_similarity(tmp_path: Path, sim, message, capsys) -> None:
    np.save(tmp_path / "s.npy", sim)
    assert _eval("retrieval", "--similarity", str(tmp_path / "s.npy")) == 2
    err = capsys.readouterr().err
    assert message in err and "s.npy" in err


@pytest.mark.parametrize("value", [0.0, 1.0, -3.5])
def test_collapsed_similarity_scores_last_and_warns(tmp_path: Path, value: float, capsys) -> None:
    np.save(tmp_path / "s.npy", np.full((100, 500), value, np.float32))
    assert _eval("retrieval", "--similarity", str(tmp_path / "s.npy")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["i2t_R@1"] == printed["t2i_R@1"] == printed["rsum"] == 0.0
    assert printed["i2t_medr"] == 496.0 and printed["t2i_medr"] == 100.0  # ranked last
    assert printed["warning"].startswith("100 of 100 images score every text the same")


def test_no_warning_when_rows_vary(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "s.npy", np.random.default_rng(0).standard_normal((4, 20)))
    assert _eval("retrieval", "--similarity", str(tmp_path / "s.npy")) == 0
    assert "warning" not in json.loads(capsys.readouterr().out)


def test_not_an_npy_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "s.npy").write_text("hello")
    assert _eval("retrieval", "--similarity", str(tmp_path / "s.npy")) == 2
    assert "not a readable .npy array" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["abc", None, "x0", 1.9, 3.0])
def test_non_integer_caption_ids_are_named(caption_files, bad, capsys) -> None:
    res, ann = caption_files
    _write(res, [{"image_id": 1, "caption": "a car"}, {"image_id": bad, "caption": "a dog"}])
    assert _eval("captions", "--results", str(res), "--annotations", str(ann)) == 2
    err = capsys.readouterr().err
    assert f'{res}: record 1 "image_id" {bad!r} is not an integer' in err
    assert err.count("\n") == 1
    _write(res, [{"image_id": 1, "caption": "a car"}])
    _write(ann, {"annotations": [{"image_id": bad, "id": 1, "caption": "A car."}]})
    assert _eval("captions", "--results", str(res), "--annotations", str(ann)) == 2
    assert f'{ann}: record 0 "image_id" {bad!r} is not an integer' in capsys.readouterr().err


def test_deeply_nested_vqa_results_are_named(vqa_files, capsys) -> None:
    res, q, a = vqa_files
    res.write_text("[" * 100_000 + "]" * 100_000)
    assert _eval("vqa", "--results", str(res), "--questions", str(q), "--annotations", str(a)) == 2
    err = capsys.readouterr().err
    assert f"{res}: not valid JSON (nested too deeply" in err and err.count("\n") == 1


def test_unwritable_out_is_named(caption_files, tmp_path, capsys) -> None:
    res, ann = caption_files
    _write(res, [{"image_id": 1, "caption": "a car"}])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    out = blocker / "scores.json"
    rc = _eval("captions", "--results", str(res), "--annotations", str(ann), "--out", str(out))
    assert rc == 2
    captured = capsys.readouterr()
    assert "CIDEr" in captured.out  # the scores are still shown
    assert f"--out {out}: cannot write it" in captured.err and captured.err.count("\n") == 1
    assert blocker.read_text() == "a file where a folder is expected\n"
