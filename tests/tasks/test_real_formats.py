"""The same finetune + evaluate code on datasets imported from COCO/Flickr Karpathy and VQA v2."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.config import Config
from vlp.data.adapters import import_karpathy, import_vqa
from vlp.evaluate import evaluate
from vlp.finetune import finetune

pytestmark = pytest.mark.slow  # imports real formats, then finetunes and evaluates

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 230), "green": (30, 180, 40)}


def _jpeg(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.paste(color, (8, 6, 28, 24))
    img.save(path, format="JPEG")


@pytest.fixture
def cfg(
    smoke_cfg: Config,
    smoke_pretrained: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return dataclasses.replace(
        smoke_cfg,
        runtime=dataclasses.replace(
            smoke_cfg.runtime,
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        finetune=dataclasses.replace(
            smoke_cfg.finetune,
            init_dir=str(smoke_pretrained),
            out_dir=str(tmp_path / "finetuned"),
            ablation=False,
        ),
        evaluate=dataclasses.replace(
            smoke_cfg.evaluate,
            models_dir=str(tmp_path / "finetuned"),
            results_dir=str(tmp_path / "results"),
            num_examples=2,
        ),
        tracking=dataclasses.replace(
            smoke_cfg.tracking, artifact_root=str(tmp_path / "mlartifacts")
        ),
    )


@pytest.fixture
def karpathy_dir(tmp_path: Path) -> Path:
    """A Karpathy-split JSON (COCO layout) over 12 tiny JPEGs, imported with the adapter."""
    raw = tmp_path / "coco"
    images, sent = [], 0
    splits = ["train"] * 5 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 3
    for i, split in enumerate(splits, start=1):
        color = list(COLORS)[i % 3]
        name = f"COCO_val2014_{i:012d}.jpg"
        _jpeg(raw / "val2014" / name, COLORS[color])
        sentences = []
        for raw_text in (f"a {color} square.", f"A {color} box on black"):
            sentences.append({"raw": raw_text, "sentid": sent, "tokens": raw_text.split()})
            sent += 1
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "cocoid": i,
                "split": split,
                "sentences": sentences,
            }
        )
    (raw / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    out = tmp_path / "karpathy"
    import_karpathy(raw / "dataset_coco.json", raw, out)
    return out


def _vqa_v2(raw: Path, subtype: str, image_ids: list[int], first_qid: int) -> tuple[Path, Path]:
    questions, annotations, qid = [], [], first_qid
    for image_id in image_ids:
        color = list(COLORS)[image_id % 3]
        _jpeg(raw / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", COLORS[color])
        for question, answer, atype, qtype in (
            ("What color is the square?", color, "other", "what color is the"),
            ("Is there a square?", "yes", "yes/no", "is there a"),
            ("How many squares are there?", "one" if image_id % 2 else "1", "number", "how many"),
        ):
            questions.append({"question_id": qid, "image_id": image_id, "question": question})
            answers = [answer] * 9 + ["2" if atype == "number" else "no"]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(answers)
                    ],
                }
            )
            qid += 1
    qpath, apath = raw / f"q_{subtype}.json", raw / f"a_{subtype}.json"
    qpath.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    return qpath, apath


def test_retrieval_and_captioning_on_an_imported_karpathy_split(
    cfg: Config, karpathy_dir: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(karpathy_dir)))
    finetune(cfg, "retrieval")
    retrieval = evaluate(cfg, "retrieval")
    # 3 test images with 2 captions each: recall@5 finds every image's caption set
    assert retrieval["pretrained"]["i2t_R@10"] == 100.0
    ranks = json.loads((tmp_path / "results" / "retrieval" / "pretrained.json").read_text())
    assert sorted(ranks["i2t"]) == ["10", "11", "12"]  # keyed by cocoid

    finetune(cfg, "captioning")
    captioning = evaluate(cfg, "captioning")
    assert set(captioning["pretrained"]) >= {"Bleu_4", "ROUGE_L", "CIDEr"}
    results = json.loads((tmp_path / "results" / "captioning" / "pretrained.json").read_text())
    assert [r["image_id"] for r in results] == [10, 11, 12]


def test_vqa_on_imported_vqa_v2_train_and_test_sets(cfg: Config, tmp_path: Path) -> None:
    raw = tmp_path / "vqa_raw"
    train_q, train_a = _vqa_v2(raw, "train2014", list(range(1, 5)), first_qid=100)
    test_q, test_a = _vqa_v2(raw, "val2014", [7, 8], first_qid=500)
    import_vqa(train_q, train_a, raw / "train2014", tmp_path / "vqa_train", split="train")
    import_vqa(test_q, test_a, raw / "val2014", tmp_path / "vqa_test", split="test")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(tmp_path / "vqa_train")),
        evaluate=dataclasses.replace(cfg.evaluate, data_root=str(tmp_path / "vqa_test")),
    )
    model = finetune(cfg, "vqa")
    vocab = json.loads((model / "task.json").read_text())["answers"]
    assert "1" in vocab and "one" not in vocab  # number words counted as digits
    doc = evaluate(cfg, "vqa")
    assert set(doc["pretrained"]) >= {"overall", "type_other", "type_yes/no", "type_number"}
    results = json.loads((tmp_path / "results" / "vqa" / "pretrained.json").read_text())
    assert sorted(r["question_id"] for r in results) == list(range(500, 506))
