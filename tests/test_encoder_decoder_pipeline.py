"""The encoder-decoder family through the CLI on the smoke profile: pretrain -> finetune
captioning -> evaluate -> register -> serve.

From params (a ViT and a GPT-2 sized by the smoke profile, vlp's tokenizer) and from a tiny
random transformers VisionEncoderDecoderModel checkpoint (`model.init_from`, its own GPT-2
tokenizer and ViT image processor). Retrieval, VQA and generation are recorded as not
applicable, and nothing exits non-zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.checkpoints.encoder_decoder import write_tiny_vit_gpt2
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import profile_dir
from vlp.models.encoder_decoder import ImageCaptioner
from vlp.models.family import load_model

pytestmark = pytest.mark.slow  # pretrains and finetunes real models

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
OTHER_TASKS = ("retrieval", "vqa", "generation")


@pytest.mark.parametrize("start", ["scratch", "checkpoint"])
def test_encoder_decoder_pipeline(
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
    sets = ["--set", "model.family=encoder-decoder", "--set", f"data.root={smoke_data}"]
    sets += ["--set", "model.image_tower=vit"]
    if start == "checkpoint":
        ckpt = write_tiny_vit_gpt2(tmp_path / "vit-gpt2")
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
    assert isinstance(pretrained, ImageCaptioner) and pretrained.cfg.family == "encoder-decoder"
    metrics = json.loads((outputs / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 4 and metrics["caption_warmup_steps"] == 2
    assert {"loss_lm_first", "loss_lm_last"} <= set(metrics)
    assert "no contrastive embeddings" in metrics["zero_shot"]
    if start == "checkpoint":
        from transformers import AutoTokenizer

        # GPT-2's tokenizer travels unchanged: padding with <|endoftext|>, no token added
        source = AutoTokenizer.from_pretrained(str(ckpt))
        assert pretrained.tokenizer.get_vocab() == source.get_vocab()
        assert (outputs / "models" / "pretrained" / "preprocessor_config.json").is_file()

    for init in ("pretrained", "scratch"):
        vlp("finetune", "captioning", "--init", init)
    model_dir = outputs / "models" / "finetuned" / "captioning-pretrained"
    info = json.loads((model_dir / "task.json").read_text())
    assert info["steps"] == 3 and info["beam_size"] == 2
    scratch = load_model(outputs / "models" / "finetuned" / "captioning-scratch").model
    assert scratch.ved.config.to_dict() == load_model(model_dir).model.ved.config.to_dict()
    for task in OTHER_TASKS:
        out = vlp("finetune", task, "--init", "pretrained")
        assert "not applicable" in out
        vlp("finetune", task, "--init", "scratch")

    for task in ("captioning", *OTHER_TASKS):
        vlp("evaluate", task)
    doc = json.loads((outputs / "metrics" / "captioning.json").read_text())
    assert {"pretrained", "scratch"} <= set(doc) and "CIDEr" in doc["pretrained"]
    for task in OTHER_TASKS:
        na = json.loads((outputs / "metrics" / f"{task}.json").read_text())
        assert na["applicable"] is False and "GPT-2 decoder" in na["reason"]

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
        for task in OTHER_TASKS:
            assert registered[task]["registered"] is False
        # the registered champion serves the captions the predictor writes
        frame = pd.DataFrame({"image": [png_bytes(40), png_bytes(41)]})
        served = mlflow.pyfunc.load_model("models:/vlp-captioning-smoke@champion").predict(frame)
        images = [Image.open(io.BytesIO(b)) for b in frame["image"]]
        assert list(served["caption"]) == load_predictor(model_dir).caption(images)
