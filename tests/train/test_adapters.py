"""Parameter-efficient finetuning on tiny real models: a fusion model and a CLIP train only
their peft adapters, the task model holds the adapter in peft's format beside an untouched
base, and every loader (load_model, the predictor, the registered pyfunc) applies it.
Gradient accumulation in finetuning, for every task."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.mlflow_helpers import empty_store, evaluated_metrics, png_bytes, store_cfg  # noqa: F401
from vlp.config import Config
from vlp.errors import ConfigError
from vlp.finetune import finetune, loss_curve_path
from vlp.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from vlp.models.family import load_model
from vlp.tasks.predictor import load_predictor

pytestmark = pytest.mark.slow  # finetunes real (tiny) models

TEXTS = ["a small red circle at the top left", "a large blue square", "two green triangles"]


def _cfg(cfg: Config, init_dir: Path, tmp_path: Path, task: str, **over: object) -> Config:
    """`cfg` finetuning `task` from `init_dir` into tmp_path, in fp32, with `over` set."""
    tcfg = dataclasses.replace(getattr(cfg.finetune, task), **over)
    return dataclasses.replace(
        cfg,
        runtime=dataclasses.replace(
            cfg.runtime,
            precision="fp32",
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        finetune=dataclasses.replace(
            cfg.finetune,
            init_dir=str(init_dir),
            out_dir=str(tmp_path / "finetuned"),
            **{task: tcfg},
        ),
    )


@pytest.fixture
def tuned_cfg(
    store_cfg: Config,  # noqa: F811
    smoke_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_cfg.tracking.uri)
    return dataclasses.replace(
        store_cfg, data=dataclasses.replace(store_cfg.data, root=str(smoke_data))
    )


LORA = dict(adapter="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=None)


def _base_copy(out: Path, dest: Path) -> Path:
    """The task model directory without its adapter: the base model with the same task.json."""
    shutil.copytree(out, dest)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"):
        (dest / name).unlink(missing_ok=True)
    return dest


def _run(tmp_path: Path, task: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps, f"tags.mlflow.runName = 'finetune-{task}-pretrained'")
    return run


def _check_adapter_only(out: Path, init_dir: Path, tmp_path: Path, task: str) -> dict:
    """Assert `out` is an untouched base of `init_dir` plus a trained adapter; its config."""
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    adapter = load_file(out / ADAPTER_WEIGHTS)
    assert adapter and all("lora_" in k for k in adapter)
    # LoRA's B starts at zero: trained, it is not
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # every weight of the model itself is bit-equal to the pretrained one
    base = load_model(_base_copy(out, tmp_path / "base")).model.state_dict()
    start = load_model(init_dir).model.state_dict()
    assert base.keys() == start.keys()
    assert [k for k in start if not torch.equal(base[k], start[k])] == []
    # what trained is the adapter alone, and MLflow and the log say how much of it
    run = _run(tmp_path, task)
    n_adapter = sum(v.numel() for v in adapter.values())
    assert int(run.data.params["num_trainable_parameters"]) == n_adapter
    assert n_adapter < int(run.data.params["num_parameters"]) / 4
    assert run.data.metrics["peak_memory_mb"] > 0
    return config


def test_lora_finetunes_a_fusion_model_and_is_served(
    tuned_cfg: Config, smoke_pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from vlp.registry import register_model

    cfg = _cfg(
        tuned_cfg, smoke_pretrained, tmp_path, "retrieval",
        **LORA, lr=0.02, max_steps=3, batch_size=4, grad_accum_steps=2,
    )  # fmt: skip
    out = finetune(cfg, "retrieval")
    config = _check_adapter_only(out, smoke_pretrained, tmp_path, "retrieval")
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"query", "value", "q_proj", "v_proj", "qkv"}
    assert "parameters train" in capsys.readouterr().out
    # loading applies the adapter: the scores differ from the base's with the same task.json
    images = [png_bytes(32), png_bytes(32)]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    adapted = load_predictor(out).score(pil, TEXTS)
    base = load_predictor(tmp_path / "base").score(pil, TEXTS)
    assert not torch.allclose(torch.tensor(adapted), torch.tensor(base), atol=1e-4)
    # ... and so does the registered pyfunc
    register_model(cfg, "retrieval", out, evaluated_metrics(out, {"rsum": 1.0}))
    served = mlflow.pyfunc.load_model("models:/vlp-retrieval@champion").predict(
        pd.DataFrame({"image": images, "text": TEXTS[:2]})
    )
    torch.testing.assert_close(
        torch.tensor(served["score"].to_numpy(float)),
        torch.tensor(adapted.diagonal()).double(),
        atol=1e-5,
        rtol=0,
    )


def test_lora_finetunes_a_clip_model_with_ema(
    tuned_cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.checkpoints.clip import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "tiny-clip")
    cfg = _cfg(
        tuned_cfg, clip, tmp_path, "retrieval",
        **LORA, lr=0.02, max_steps=3, batch_size=8, ema_decay=0.5,
    )  # fmt: skip
    out = finetune(cfg, "retrieval")
    config = _check_adapter_only(out, clip, tmp_path, "retrieval")
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    adapted = load_model(out)
    assert adapted.family.name == "clip"
    feats = adapted.text_features(TEXTS)
    base = load_model(tmp_path / "base").text_features(TEXTS)
    assert not torch.allclose(feats, base, atol=1e-4)


def test_adapter_with_frozen_vqa_encoders_is_refused(
    tuned_cfg: Config, smoke_pretrained: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tuned_cfg, smoke_pretrained, tmp_path, "vqa", **LORA, freeze_encoders=True)
    with pytest.raises(
        ConfigError, match="finetune.vqa.adapter: lora .*freeze_encoders keeps frozen"
    ):
        finetune(cfg, "vqa")


def test_lora_targets_that_match_nothing_are_refused(
    tuned_cfg: Config, smoke_pretrained: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        tuned_cfg, smoke_pretrained, tmp_path, "captioning", **{**LORA, "lora_targets": ["nope"]}
    )
    with pytest.raises(ConfigError, match=r"finetune.captioning.lora_targets: \['nope'\]"):
        finetune(cfg, "captioning")


def test_vqa_accumulation_equals_the_bigger_batch(
    tuned_cfg: Config, smoke_pretrained: Path, tmp_path: Path
) -> None:
    # the answer decoder's soft-score BCE is a mean over the batch: two micro-batches of 4
    # give the gradient of one batch of 8 (the frozen encoders have no dropout)
    heads = {}
    for accum in (1, 2):
        cfg = _cfg(
            tuned_cfg, smoke_pretrained, tmp_path / str(accum), "vqa",
            batch_size=8 // accum, grad_accum_steps=accum, max_steps=2,
        )  # fmt: skip
        heads[accum] = load_file(finetune(cfg, "vqa") / "answer_head.safetensors")
    assert heads[1].keys() == heads[2].keys()
    diffs = {k: float((heads[2][k] - heads[1][k]).abs().max()) for k in heads[1]}
    # attention key biases get a zero gradient (softmax ignores a shift): Adam turns its float
    # noise into steps of up to lr, so they agree to the step size, not to rounding
    noise = {k for k in diffs if k.endswith("in_proj_bias")}
    assert max(d for k, d in diffs.items() if k not in noise) < 1e-6, diffs
    assert max(diffs[k] for k in noise) < 1e-4, diffs


@pytest.mark.parametrize("task", ["captioning", "generation"])
def test_every_task_accumulates_gradients(
    tuned_cfg: Config, smoke_pretrained: Path, tmp_path: Path, task: str
) -> None:
    over: dict[str, object] = {"batch_size": 4, "grad_accum_steps": 2, "max_steps": 2}
    if task == "captioning":  # DoRA, peft's LoRA with learned magnitudes, on the way
        over.update({**LORA, "adapter": "dora"})
    out = finetune(_cfg(tuned_cfg, smoke_pretrained, tmp_path, task, **over), task)
    cfg = _cfg(tuned_cfg, smoke_pretrained, tmp_path, task, **over)
    assert _run(tmp_path, task).data.metrics["steps"] == 2
    with loss_curve_path(cfg, task, "pretrained").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2]
    if task == "captioning":
        assert json.loads((out / ADAPTER_CONFIG).read_text())["use_dora"] is True
        (caption,) = load_predictor(out).caption([Image.new("RGB", (32, 32))])
        assert isinstance(caption, str)
