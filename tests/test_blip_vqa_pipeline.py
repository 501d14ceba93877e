"""A BLIP VQA checkpoint through the CLI: it answers zero-shot as `BlipForQuestionAnswering`
does, is refused for retrieval (and skipped by pretraining's retrieval check) with one reason,
and finetunes for VQA with its answer decoder (`finetune.vqa.head: generate`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints.blip import TEXT_WIDTH, make_blip_checkpoint, words_of
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import profile_dir

pytestmark = pytest.mark.slow  # generates data, answers, finetunes

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
SMOKE = ["--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke"]
OUT = profile_dir("smoke")


@pytest.fixture
def workdir(
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main([*SMOKE, "generate"]) == 0
    return tmp_path


def _data(workdir: Path) -> Path:
    return workdir / OUT / "data" / "shapes"


def _blip_vqa(workdir: Path) -> Path:
    from vlp.data.manifest import read_pairs, read_vqa

    data = _data(workdir)
    vqa = read_vqa(data, ["train", "test"])
    texts = [*read_pairs(data, ["train", "test"])["caption"], *vqa["question"]]
    texts += [a for answers in vqa["answers"] for a in answers]
    return make_blip_checkpoint(
        workdir / "blip_vqa",
        "BlipForQuestionAnswering",
        words=words_of(texts),
        vision_width=TEXT_WIDTH,
    )


def _transformers_answers(ckpt: Path, data: Path, max_new_tokens: int) -> dict[int, str]:
    """`BlipForQuestionAnswering.generate` on the test questions, [ENC] first, one batch."""
    from PIL import Image
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from vlp.data.manifest import read_vqa

    frame = read_vqa(data, "test")
    processor = BlipProcessor.from_pretrained(str(ckpt))
    hf = BlipForQuestionAnswering.from_pretrained(str(ckpt)).eval()
    images = [Image.open(data / p).convert("RGB") for p in frame["image_path"]]
    enc = processor.tokenizer(list(frame["question"]), padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
        )
    answers = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
    return {int(q): a.strip() for q, a in zip(frame["question_id"], answers, strict=True)}


def _answers(model: Path, data: Path) -> dict[int, str]:
    """The answers `vlp zeroshot --vqa` scores, by question id (test split, fp32)."""
    from vlp.config import load_config
    from vlp.tasks.vqa.task import evaluate
    from vlp.tasks.vqa.zeroshot import load_answerer

    cfg = load_config(REPO_ROOT / "params.yaml", profile="smoke")
    _, answerer = load_answerer(cfg, model, "fp32", None)
    return {r["question_id"]: r["answer"] for r in evaluate(cfg, answerer, data).results}


def _zeroshot(model: Path, data: Path, out: Path, *extra: str) -> int:
    args = ["--model", str(model), "--data", str(data), "--out", str(out), *extra]
    return main([*SMOKE, "--set", "runtime.device=cpu", "zeroshot", *args])


def test_a_blip_vqa_checkpoint_answers_zero_shot_and_finetunes_with_its_decoder(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlp.data.manifest import read_vqa
    from vlp.metrics.vqa import vqa_accuracy
    from vlp.models.blip import load_blip
    from vlp.models.vlp_model import VLPModel

    ckpt, data = _blip_vqa(workdir), _data(workdir)
    # zero-shot VQA: transformers' own answers, scored by vlp's VQA metric
    assert _zeroshot(ckpt, data, workdir / "z.json", "--vqa", "--precision", "fp32") == 0
    scores = json.loads((workdir / "z.json").read_text())
    frame = read_vqa(data, "test")
    answers = _transformers_answers(ckpt, data, max_new_tokens=9)  # zeroshot.answer_max_length
    assert _answers(ckpt, data) == answers and all(answers.values())
    want = vqa_accuracy(
        answers,
        {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)},
    )
    assert scores["overall"] == pytest.approx(float(want["overall"]))

    # ranking candidate answers instead (BLIP's VQA v2 leaderboard answers)
    candidates = sorted({a for answers in frame["answers"] for a in answers})
    (workdir / "answers.json").write_text(json.dumps(candidates))
    rank = ["--vqa", "--answers", str(workdir / "answers.json"), "--precision", "fp32"]
    assert _zeroshot(ckpt, data, workdir / "k.json", *rank) == 0
    ranked = json.loads((workdir / "k.json").read_text())
    assert ranked["overall"] > 0.0  # every answer is a real one of the split's
    assert _zeroshot(ckpt, data, workdir / "x.json", *rank[1:3]) == 2
    assert "--answers ranks VQA answers: it needs --task vqa (--vqa)" in capsys.readouterr().err

    # retrieval refuses it, and pretraining's check of it untrained is skipped, for one reason
    assert _zeroshot(ckpt, data, workdir / "r.json") == 2
    reason = "holds a BlipForQuestionAnswering; only BlipForImageTextRetrieval has the trained"
    assert reason in capsys.readouterr().err
    sets = ["--set", f"model.init_from={ckpt}", "--set", "pretrain.enabled=false"]
    assert main([*SMOKE, *sets, "pretrain"]) == 0
    doc = json.loads((workdir / OUT / "metrics" / "pretrain.json").read_text())
    assert doc["zero_shot"].startswith("skipped: model.init_from: ") and reason in doc["zero_shot"]

    # finetuned with the generate head (lr 0: the weights stay BLIP's), the task model keeps
    # and answers with the checkpoint's answer decoder
    head = ["--set", "finetune.vqa.head=generate", "--set", "finetune.vqa.lr=0.0"]
    head += ["--set", "finetune.vqa.answer_max_length=9"]
    assert main([*SMOKE, *sets, *head, "finetune", "vqa", "--init", "pretrained"]) == 0
    task_dir = workdir / OUT / "models" / "finetuned" / "vqa-pretrained"
    info = json.loads((task_dir / "task.json").read_text())
    assert info["generative"] is True and info["steps"] == 3
    assert not (task_dir / "answer_head.safetensors").exists()
    ours = VLPModel.from_pretrained(task_dir).text_decoder.state_dict()
    theirs = load_blip(ckpt, None, 0.07).text_decoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert _zeroshot(task_dir, data, workdir / "t.json", "--vqa", "--precision", "fp32") == 0
    assert json.loads((workdir / "t.json").read_text())["overall"] == scores["overall"]
    assert _answers(task_dir, data) == answers

    # the checkpoint saved as vlp's pretrained model writes the same answers zero-shot
    pretrained = workdir / OUT / "models" / "pretrained"
    assert _zeroshot(pretrained, data, workdir / "p.json", "--vqa", "--precision", "fp32") == 0
    assert json.loads((workdir / "p.json").read_text())["overall"] == scores["overall"]
