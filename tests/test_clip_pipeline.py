"""The clip family through the CLI on the smoke profile: pretrain -> finetune -> evaluate -> register.

From scratch (params-sized CLIP, vlp's tokenizer) and from a tiny random transformers
CLIPModel checkpoint (`model.init_from`, its own CLIP tokenizer); generation conditions on
its text tower and re-ranks by ITC; captioning and VQA are recorded as not applicable, and
nothing exits non-zero.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints.clip import write_tiny_clip
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import profile_dir
from vlp.models.clip import CLIPDualEncoder
from vlp.models.family import load_model

pytestmark = pytest.mark.slow  # pretrains and finetunes real models

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")


def _runs(db: Path) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs(exps)}


@pytest.mark.parametrize("start", ["scratch", "checkpoint"])
def test_clip_pipeline(
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
    monkeypatch.chdir(tmp_path)  # every output in the smoke profile's folder here
    outputs = tmp_path / profile_dir("smoke")
    sets = ["--set", "model.family=clip", "--set", f"data.root={smoke_data}"]
    if start == "checkpoint":
        ckpt = write_tiny_clip(tmp_path / "tiny-clip")
        sets += ["--set", f"model.init_from={ckpt}"]

    def vlp(*args: str) -> str:
        code = main(
            ["--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke", *sets, *args]
        )
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return out.out

    out = vlp("pretrain")
    # the smoke profile keeps the fusion weights and warm-up: the clip family says it ignores them
    assert "pretrain.itm_weight and pretrain.lm_weight ignored" in out
    assert "caption_warmup_steps ignored" in out
    pretrained = load_model(outputs / "models" / "pretrained").model
    assert isinstance(pretrained, CLIPDualEncoder) and pretrained.cfg.family == "clip"
    metrics = json.loads((outputs / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 4 and "caption_warmup_steps" not in metrics
    assert set(k for k in metrics if k.startswith("loss_")) == {
        "loss_first",
        "loss_last",
        "loss_itc_first",
        "loss_itc_last",
    }
    assert 0 <= metrics["zeroshot_t2i_R@1"] <= 100
    if start == "checkpoint":
        from transformers import CLIPModel, CLIPTokenizer

        # CLIP's tokenizer travels unchanged: no BERT or BLIP tokens added
        tok = pretrained.tokenizer
        assert tok.get_vocab() == CLIPTokenizer.from_pretrained(str(ckpt)).get_vocab()
        assert tok.cls_token is None and "[ENC]" not in tok.get_vocab()
        source = CLIPModel.from_pretrained(str(ckpt)).state_dict()
        trained = pretrained.clip.state_dict()
        assert source.keys() == trained.keys()
        assert any(not torch.equal(source[k], trained[k]) for k in source)  # it trained
    else:
        assert pretrained.clip.config.text_config.eos_token_id == pretrained.tokenizer.sep_token_id

    for init in ("pretrained", "scratch"):
        vlp("finetune", "retrieval", "--init", init)
    model_dir = outputs / "models" / "finetuned" / "retrieval-pretrained"
    info = json.loads((model_dir / "task.json").read_text())
    assert info["rerank_k"] == 0 and info["steps"] == 3
    finetuned = load_model(model_dir).model
    scratch = load_model(outputs / "models" / "finetuned" / "retrieval-scratch").model
    assert finetuned.clip.config.to_dict() == scratch.clip.config.to_dict()
    assert scratch.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
    with (outputs / "plots" / "finetune_retrieval_pretrained.csv").open() as f:
        assert {"loss", "loss_itc"} <= set(next(csv.reader(f)))

    for task in ("captioning", "vqa"):
        for init in ("pretrained", "scratch"):
            out = vlp("finetune", task, "--init", init)
            assert "not applicable" in out
            na = json.loads(
                (outputs / "models" / "finetuned" / f"{task}-{init}" / "task.json").read_text()
            )
            assert na["applicable"] is False and "dual encoder" in na["reason"]

    # generation conditions on the dual encoder's text tower; it has no ITM head to re-rank by
    for init in ("pretrained", "scratch"):
        out = vlp("finetune", "generation", "--init", init)
        assert "rerank: itm ignored" in out
    gen_info = json.loads(
        (outputs / "models" / "finetuned" / "generation-pretrained" / "task.json").read_text()
    )
    assert gen_info["rerank"] == "itc"

    for task in ("retrieval", "captioning", "vqa", "generation"):
        vlp("evaluate", task)
    gen = json.loads((outputs / "metrics" / "generation.json").read_text())
    assert {"pretrained", "scratch"} <= set(gen) and gen.get("applicable", True) is not False
    doc = json.loads((outputs / "metrics" / "retrieval.json").read_text())
    pre = doc["pretrained"]
    assert doc["rsum"] == pre["rsum"] and "scratch" in doc
    # no re-ranking: the ranked recalls are the ITC ones
    assert pre["i2t_R@1"] == pre["itc_i2t_R@1"] and pre["t2i_R@5"] == pre["itc_t2i_R@5"]
    for task in ("captioning", "vqa"):
        na = json.loads((outputs / "metrics" / f"{task}.json").read_text())
        assert na["applicable"] is False and "dual encoder" in na["reason"]
        assert (outputs / "results" / task / "not_applicable.json").exists()

    runs = _runs(tmp_path / "mlflow.db")
    for name in ("finetune-captioning-pretrained", "evaluate-vqa"):
        assert runs[name].data.tags["vlp.applicable"] == "false"
    assert "vlp.applicable" not in runs["evaluate-retrieval"].data.tags

    if start == "checkpoint":
        vlp("register", "all", "--out", str(tmp_path / "registered.json"))
        registered = {r["task"]: r for r in json.loads((tmp_path / "registered.json").read_text())}
        assert registered["retrieval"]["version"] == "1"
        assert registered["generation"]["version"] == "1"
        for task in ("captioning", "vqa"):
            assert registered[task]["registered"] is False
            assert "not applicable" in registered[task]["why"]
        # the registered champion serves scores: the ITC logit, as the predictor ranks
        import mlflow
        import pandas as pd

        from tests.mlflow_helpers import png_bytes
        from vlp.tasks.predictor import load_predictor

        frame = pd.DataFrame({"image": [png_bytes(40), png_bytes(40)], "text": ["red", "the"]})
        served = mlflow.pyfunc.load_model("models:/vlp-retrieval-smoke@champion").predict(frame)
        assert list(served.columns) == ["score"] and len(served) == 2
        import io

        from PIL import Image

        images = [Image.open(io.BytesIO(b)) for b in frame["image"]]
        scores = load_predictor(model_dir).score(images, list(frame["text"]))
        assert served["score"].map(float).tolist() == pytest.approx(
            [float(scores[0, 0]), float(scores[1, 1])], abs=1e-4
        )
