"""A BLIP checkpoint as the pretrained model, through the CLI: no pretraining, then finetune and evaluate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints.blip import make_blip_checkpoint, words_of
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import Config, profile_dir

pytestmark = pytest.mark.slow  # finetunes and evaluates four models

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
SMOKE = ["--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke"]
OUT = profile_dir("smoke")  # where the smoke profile writes, data included


@pytest.fixture
def workdir(
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A working directory with its own MLflow store and the smoke data from `vlp generate`."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # the profile's data/, models/, metrics/ here
    assert main([*SMOKE, "generate"]) == 0
    return tmp_path


def _blip(workdir: Path) -> Path:
    from vlp.data.manifest import read_pairs

    captions = read_pairs(workdir / OUT / "data" / "shapes", ["pretrain", "train", "test"])[
        "caption"
    ]
    return make_blip_checkpoint(workdir / "blip", words=words_of(captions), image_size=32)


def test_a_blip_checkpoint_is_the_pretrained_model_of_the_whole_pipeline(workdir: Path) -> None:
    import mlflow
    from transformers import AutoImageProcessor, BlipForImageTextRetrieval

    from vlp.models import VLPModel

    ckpt = _blip(workdir)
    sets = ["--set", f"model.init_from={ckpt}", "--set", "pretrain.enabled=false"]
    assert main([*SMOKE, *sets, "pretrain"]) == 0

    pretrained = workdir / OUT / "models" / "pretrained"
    doc = json.loads((workdir / OUT / "metrics" / "pretrain.json").read_text())
    assert doc["steps"] == 0 and doc["init_from"] == str(ckpt)
    assert 0.0 <= doc["zeroshot_t2i_R@1"] <= 100.0 and doc["zeroshot_n_images"] == 8
    with (workdir / OUT / "plots" / "pretrain_loss.csv").open() as f:
        assert list(csv.reader(f)) == [["step", "loss", "loss_itc", "loss_itm", "loss_lm", "lr"]]
    assert AutoImageProcessor.from_pretrained(str(pretrained)).size["height"] == 32
    assert not (workdir / OUT / "models" / "pretrained.work").exists()  # nothing trained

    # the saved model, without the checkpoint, reproduces BLIP's ITC similarities
    model = VLPModel.from_pretrained(pretrained).eval()
    hf = BlipForImageTextRetrieval.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = model.tokenize(["a red circle left of a blue square", "a green triangle"])
    with torch.no_grad():
        ours = model.encode_image(pixels)[1] @ model.encode_text(**enc)[1].t()
        theirs = hf(pixel_values=pixels, use_itm_head=False, **enc).itm_score
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain"]
    assert run.data.params["pretrain.enabled"] == "False"
    assert run.data.tags["vlp.init_from"] == str(ckpt)
    assert run.data.metrics["zeroshot_t2i_R_at_1"] == pytest.approx(doc["zeroshot_t2i_R@1"])

    for task in ("retrieval", "captioning"):
        for init in ("pretrained", "scratch"):
            assert main([*SMOKE, *sets, "finetune", task, "--init", init]) == 0
            info = json.loads(
                (
                    workdir / OUT / "models" / "finetuned" / f"{task}-pretrained" / "task.json"
                ).read_text()
            )
            assert info["steps"] == 3
    assert main([*SMOKE, *sets, "evaluate", "retrieval"]) == 0
    scores = json.loads((workdir / OUT / "metrics" / "retrieval.json").read_text())
    for init in ("pretrained", "scratch"):
        assert 0.0 <= scores[init]["rsum"] <= 600.0
    assert scores["delta"]["rsum"] == pytest.approx(
        scores["pretrained"]["rsum"] - scores["scratch"]["rsum"]
    )
    # the scratch ablation has BLIP's architecture and tokenizer, not its weights
    scratch = VLPModel.from_pretrained(workdir / OUT / "models" / "finetuned" / "retrieval-scratch")
    assert scratch.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert type(scratch.image_tower) is type(model.image_tower)
    assert scratch.vision_proj.weight.shape == model.vision_proj.weight.shape
    assert not torch.allclose(scratch.vision_proj.weight, model.vision_proj.weight, atol=0.05)


def test_init_from_with_enabled_true_trains_from_the_checkpoint(
    workdir: Path, smoke_cfg: Config
) -> None:
    from vlp.models import VLPModel
    from vlp.models.blip import load_blip

    ckpt = _blip(workdir)
    sets = ["--set", f"model.init_from={ckpt}", "--set", "pretrain.caption_warmup_steps=0"]
    assert main([*SMOKE, *sets, "--set", "pretrain.max_steps=2", "pretrain"]) == 0
    trained = VLPModel.from_pretrained(workdir / OUT / "models" / "pretrained")
    start = load_blip(ckpt, smoke_cfg.model, smoke_cfg.model.temperature)
    assert trained.tokenizer.get_vocab() == start.tokenizer.get_vocab()
    before, after = start.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    key = "text_encoder.encoder.layer.0.attention.self.query.weight"
    # two small steps from BLIP's weights: moved, but close (a fresh init would be far)
    assert not torch.equal(before[key], after[key])
    assert (before[key] - after[key]).abs().max() < 0.05
    assert json.loads((workdir / OUT / "metrics" / "pretrain.json").read_text())["steps"] == 2


def test_pretrain_disabled_needs_init_from_and_init_from_must_be_a_known_model(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*SMOKE, "--set", "pretrain.enabled=false", "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.enabled" in err and "model.init_from" in err
    assert main([*SMOKE, "--set", f"model.init_from={workdir / 'nope'}", "pretrain"]) == 2
    assert "model.init_from" in capsys.readouterr().err
    (workdir / "bert").mkdir()
    (workdir / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    sets = ["--set", f"model.init_from={workdir / 'bert'}", "--set", "pretrain.enabled=false"]
    assert main([*SMOKE, *sets, "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "'bert'" in err
    (workdir / "clip").mkdir()
    (workdir / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    sets = ["--set", f"model.init_from={workdir / 'clip'}", "--set", "pretrain.enabled=false"]
    assert main([*SMOKE, *sets, "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "set model.family: clip" in err
    assert not (workdir / OUT / "models").exists()  # nothing written
