"""`pretrain` starting its ViT image tower from the masked autoencoder `pretrain-vision` trained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.checkpoints.mae import write_tiny_mae
from tests.stage_helpers import isolated_cfg
from vlp.config import Config
from vlp.data.processors import PROCESSOR_FILE
from vlp.errors import ConfigError
from vlp.pretrain import pretrain
from vlp.vision_init import DISABLED_MARKER, holds_trained_mae, with_mae_tower


def _with(cfg: Config, mae: Path, **model: object) -> Config:
    """`cfg` with MAE pretraining on (output `mae`) and a ViT tower, `model` applied."""
    return dataclasses.replace(
        cfg,
        pretrain_vision=dataclasses.replace(cfg.pretrain_vision, enabled=True, out_dir=str(mae)),
        model=dataclasses.replace(cfg.model, **{"image_tower": "vit", **model}),
    )


@pytest.fixture
def cfg(smoke_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    return isolated_cfg(smoke_cfg, tmp_path, monkeypatch)


def test_the_disabled_stage_marker_is_no_trained_mae(tmp_path: Path) -> None:
    mae = write_tiny_mae(tmp_path / "mae")
    assert holds_trained_mae(mae)
    assert not holds_trained_mae(tmp_path / "absent")
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / DISABLED_MARKER).write_text(json.dumps({"enabled": False}))
    assert not holds_trained_mae(tmp_path / "off")


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"image_tower": "cnn"}, "model.image_tower: 'cnn'"),
        ({"image_pretrained": "elsewhere"}, "model.image_pretrained: 'elsewhere'"),
        ({"init_from": "elsewhere"}, "model.init_from: 'elsewhere'"),
        ({"family": "clip"}, "model.family: 'clip'"),
    ],
)
def test_mae_start_conflicts_are_refused_before_anything_is_written(
    cfg: Config, tmp_path: Path, model: dict, match: str
) -> None:
    mae = write_tiny_mae(tmp_path / "mae")
    with pytest.raises(ConfigError, match=match):
        pretrain(_with(cfg, mae, **model))
    assert not Path(cfg.pretrain.out_dir).parent.exists()
    assert not Path(cfg.runtime.metrics_dir).exists()


def test_a_disabled_or_missing_mae_is_refused(cfg: Config, tmp_path: Path) -> None:
    off = tmp_path / "off"
    off.mkdir()
    (off / DISABLED_MARKER).write_text(json.dumps({"enabled": False}))
    for mae in (off, tmp_path / "absent"):
        with pytest.raises(ConfigError, match=f"pretrain_vision.out_dir: {mae} holds no trained"):
            pretrain(_with(cfg, mae))
    assert not Path(cfg.pretrain.out_dir).parent.exists()
    # disabled, the stage's output is not read at all
    unused = dataclasses.replace(_with(cfg, off), pretrain_vision=cfg.pretrain_vision)
    assert not unused.pretrain_vision.enabled and with_mae_tower(unused) is unused


def test_fingerprint_and_inputs_name_the_mae_by_content(cfg: Config, tmp_path: Path) -> None:
    from vlp.pretrain_fingerprint import fingerprint, read_inputs
    from vlp.tasks import model_sha256

    mae = write_tiny_mae(tmp_path / "mae", image_size=cfg.data.image_size)
    on = _with(cfg, mae)
    before = fingerprint(on)["params"]
    assert before["pretrain_vision.out_dir"] == model_sha256(mae)
    assert before["image_processor"][PROCESSOR_FILE]["image_mean"] == [0.4] * 3
    assert read_inputs(on, "h")["pretrain_vision.out_dir"] == (str(mae), model_sha256(mae))
    write_tiny_mae(mae, image_size=cfg.data.image_size, seed=1)  # pretrain-vision ran again
    assert fingerprint(on)["params"] != before


@pytest.mark.slow
def test_pretrain_starts_from_the_mae_encoder_and_trains(
    cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from transformers import ViTMAEForPreTraining

    import vlp.pretrain
    from vlp.models import VLPModel

    mae = write_tiny_mae(tmp_path / "mae", image_size=cfg.data.image_size)
    encoder = ViTMAEForPreTraining.from_pretrained(str(mae)).vit.state_dict()
    at_start: list[dict[str, torch.Tensor]] = []
    real_train = vlp.pretrain.train

    def train(objective, *args, **kw):
        if not at_start:  # the first phase's first step has not run yet
            backbone = objective.model.image_tower.backbone
            at_start.append({k: v.clone() for k, v in backbone.state_dict().items()})
        return real_train(objective, *args, **kw)

    monkeypatch.setattr(vlp.pretrain, "train", train)
    out = pretrain(_with(cfg, mae))

    (start,) = at_start
    assert start.keys() == encoder.keys()
    for key, value in encoder.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    trained = VLPModel.from_pretrained(out).image_tower.backbone.state_dict()
    patch = "embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(trained[patch], encoder[patch])
    assert json.loads((out / PROCESSOR_FILE).read_text()) == json.loads(
        (mae / PROCESSOR_FILE).read_text()
    )
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain"]
    assert run.data.tags["vlp.input.pretrain_vision.out_dir.path"] == str(mae)
    assert run.data.params["pretrain_vision.enabled"] == "True"
