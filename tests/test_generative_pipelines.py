"""The generative families through the CLI on the smoke profile: pretrain -> finetune
captioning and VQA -> evaluate -> register -> serve.

encoder-decoder: from params (a ViT and a GPT-2 sized by the smoke profile, vlp's tokenizer)
and from a tiny random transformers VisionEncoderDecoderModel checkpoint (`model.init_from`,
its own GPT-2 tokenizer and ViT image processor). t5: from params (the smoke CNN tower and a
T5, vlp's tokenizer) and from a tiny random T5ForConditionalGeneration checkpoint (its own
tokenizer; the image tower from the params). VQA is answered by writing the answer;
retrieval and generation are recorded as not applicable, and nothing exits non-zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.checkpoints.encoder_decoder import write_tiny_vit_gpt2
from tests.checkpoints.t5 import write_tiny_t5
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import profile_dir
from vlp.models.family import load_model

pytestmark = pytest.mark.slow  # pretrains and finetunes real models

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
OTHER_TASKS = ("retrieval", "generation")
# family -> (its checkpoint writer, the params it runs with, words of its description)
FAMILIES = {
    "encoder-decoder": (write_tiny_vit_gpt2, ["model.image_tower=vit"], "GPT-2 decoder"),
    "t5": (write_tiny_t5, [], "T5 encoder-decoder"),
}


@pytest.mark.parametrize("start", ["scratch", "checkpoint"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generative_pipeline(
    family: str,
    start: str,
    smoke_data: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / profile_dir("smoke")
    write_checkpoint, extra, description = FAMILIES[family]
    sets = ["--set", f"model.family={family}", "--set", f"data.root={smoke_data}"]
    for setting in extra:
        sets += ["--set", setting]
    if start == "checkpoint":
        ckpt = write_checkpoint(tmp_path / "checkpoint")
        sets += ["--set", f"model.init_from={ckpt}"]

    def vlp(*args: str) -> str:
        code = main(
            ["--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke", *sets, *args]
        )
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return out.out

    out = vlp("pretrain")
    assert "pretrain.itc_weight and pretrain.itm_weight ignored" in out
    pretrained = load_model(outputs / "models" / "pretrained").model
    assert pretrained.cfg.family == family
    metrics = json.loads((outputs / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 4 and metrics["caption_warmup_steps"] == 2
    assert {"loss_lm_first", "loss_lm_last"} <= set(metrics)
    assert "no contrastive embeddings" in metrics["zero_shot"]
    # the pretrained model, measured untrained on what it writes
    for task, key in (("captioning", "CIDEr"), ("vqa", "overall")):
        out_file = tmp_path / f"zeroshot-{task}.json"
        model = str(outputs / "models" / "pretrained")
        vlp(
            "zeroshot",
            "--model",
            model,
            "--data",
            str(smoke_data),
            "--task",
            task,
            "--out",
            str(out_file),
        )
        assert key in json.loads(out_file.read_text())
    if start == "checkpoint":
        from transformers import AutoTokenizer

        # the checkpoint's tokenizer travels unchanged (GPT-2's pads with <|endoftext|>)
        source = AutoTokenizer.from_pretrained(str(ckpt))
        assert pretrained.tokenizer.get_vocab() == source.get_vocab()

    for init in ("pretrained", "scratch"):
        vlp("finetune", "captioning", "--init", init)
    model_dir = outputs / "models" / "finetuned" / "captioning-pretrained"
    info = json.loads((model_dir / "task.json").read_text())
    assert info["steps"] == 3 and info["beam_size"] == 2
    for init in ("pretrained", "scratch"):
        vlp("finetune", "vqa", "--init", init)
    vqa_info = json.loads(
        (outputs / "models" / "finetuned" / "vqa-pretrained" / "task.json").read_text()
    )
    assert vqa_info["generative"] is True and vqa_info["answer_max_length"] == 8
    scratch = load_model(outputs / "models" / "finetuned" / "captioning-scratch").model
    assert scratch.architecture_configs() == load_model(model_dir).model.architecture_configs()
    for task in OTHER_TASKS:
        out = vlp("finetune", task, "--init", "pretrained")
        assert "not applicable" in out
        vlp("finetune", task, "--init", "scratch")

    for task in ("captioning", "vqa", *OTHER_TASKS):
        vlp("evaluate", task)
    doc = json.loads((outputs / "metrics" / "captioning.json").read_text())
    assert {"pretrained", "scratch"} <= set(doc) and "CIDEr" in doc["pretrained"]
    doc = json.loads((outputs / "metrics" / "vqa.json").read_text())
    assert 0 <= doc["pretrained"]["overall"] <= 100 and "scratch" in doc
    for task in OTHER_TASKS:
        na = json.loads((outputs / "metrics" / f"{task}.json").read_text())
        assert na["applicable"] is False and description in na["reason"]

    if start == "checkpoint":
        import io

        import mlflow
        import pandas as pd
        from PIL import Image

        from tests.mlflow_helpers import png_bytes
        from vlp.tasks.predictor import load_predictor

        vlp("register", "all", "--out", str(tmp_path / "registered.json"))
        registered = {r["task"]: r for r in json.loads((tmp_path / "registered.json").read_text())}
        assert registered["captioning"]["version"] == "1"
        assert registered["vqa"]["version"] == "1"
        for task in OTHER_TASKS:
            assert registered[task]["registered"] is False
        # the registered champion serves the captions the predictor writes
        frame = pd.DataFrame({"image": [png_bytes(40), png_bytes(41)]})
        served = mlflow.pyfunc.load_model("models:/vlp-captioning-smoke@champion").predict(frame)
        images = [Image.open(io.BytesIO(b)) for b in frame["image"]]
        assert list(served["caption"]) == load_predictor(model_dir).caption(images)
        questions = ["what colour is the circle?", "how many shapes are there?"]
        frame = frame.assign(question=questions)
        served = mlflow.pyfunc.load_model("models:/vlp-vqa-smoke@champion").predict(frame)
        vqa_dir = outputs / "models" / "finetuned" / "vqa-pretrained"
        assert list(served["answer"]) == load_predictor(vqa_dir).answer(images, questions)
