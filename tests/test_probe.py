"""The probe stage: linear probes of frozen image encoders on the shapes world's labels."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints.mae import write_tiny_mae
from tests.checkpoints.vlp import tiny_vlp_dir
from vlp.config import Config, ProbeConfig
from vlp.probe import CLASSES, fit_linear_probe, majority_accuracy, probe, probe_labels

SETTINGS = ProbeConfig(train_split="train", eval_split="test", max_iter=100, l2=1e-3, batch_size=4)


def _labels(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def test_features_that_encode_the_label_score_100() -> None:
    k = 5
    train_y, eval_y = _labels(40, k, 0), _labels(20, k, 1)
    noise = torch.Generator().manual_seed(2)

    # the label one-hot, scaled, among 6 uninformative features
    def features(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([3 * torch.eye(k)[y], torch.randn(len(y), 6, generator=noise)], dim=1)

    acc = fit_linear_probe(features(train_y), train_y, features(eval_y), eval_y, k, SETTINGS)
    assert acc == 100.0


def test_constant_features_score_chance() -> None:
    k = 7
    train_y = torch.tensor([0, 3, 3, 3, 5, 5, 6, 1])  # 3 is the majority
    eval_y = torch.tensor([3, 3, 1, 2, 3, 0])
    chance = majority_accuracy(train_y, eval_y, k)
    assert chance == pytest.approx(50.0)
    constant = torch.full((len(train_y), 4), 0.7), torch.full((len(eval_y), 4), 0.7)
    assert fit_linear_probe(constant[0], train_y, constant[1], eval_y, k, SETTINGS) == chance


@pytest.fixture
def cfg(smoke_cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch) -> Config:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    pretrained = tiny_vlp_dir(smoke_cfg, tmp_path / "pretrained")
    return dataclasses.replace(
        smoke_cfg,
        runtime=dataclasses.replace(smoke_cfg.runtime, metrics_dir=str(tmp_path / "metrics")),
        pretrain=dataclasses.replace(smoke_cfg.pretrain, out_dir=str(pretrained)),
        pretrain_vision=dataclasses.replace(
            smoke_cfg.pretrain_vision, out_dir=str(tmp_path / "mae")
        ),
        tracking=dataclasses.replace(
            smoke_cfg.tracking, artifact_root=str(tmp_path / "mlartifacts")
        ),
    )


@pytest.mark.slow  # three probe runs of three encoders
def test_probe_scores_the_three_encoders_on_smoke_data(cfg: Config, tmp_path: Path) -> None:
    write_tiny_mae(tmp_path / "mae", image_size=cfg.data.image_size)
    on = dataclasses.replace(
        cfg, pretrain_vision=dataclasses.replace(cfg.pretrain_vision, enabled=True)
    )
    result = json.loads(probe(on).read_text())
    train = probe_labels(cfg.data.root, cfg.probe.train_split)
    evaluated = probe_labels(cfg.data.root, cfg.probe.eval_split)
    assert result["n_train"] == len(train) > 0 and result["n_eval"] == len(evaluated) > 0
    assert set(result["accuracy"]) == {"random", "mae", "pretrained"}
    grid = 100.0 / len(evaluated)  # accuracies are multiples of one image
    for scores in [result["chance"], *result["accuracy"].values()]:
        assert set(scores) == set(CLASSES)
        for acc in scores.values():
            assert 0.0 <= acc <= 100.0 and acc / grid == pytest.approx(round(acc / grid))
    # deterministic: a second run writes the same numbers
    assert json.loads(probe(on).read_text()) == result
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    runs = [r for r in runs if r.data.tags.get("vlp.stage") == "probe"]
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["vlp.input.pretrain_vision.out_dir.path"] == str(tmp_path / "mae")
        assert run.data.metrics["mae_shape_accuracy"] == result["accuracy"]["mae"]["shape"]

    # without a trained MAE, its entry is null
    result = json.loads(probe(cfg).read_text())
    assert result["accuracy"]["mae"] is None and result["accuracy"]["pretrained"] is not None


def test_data_without_shape_labels_is_skipped(cfg: Config, tmp_path: Path) -> None:
    from vlp.data.manifest import PAIRS_FILE, read_pairs, write_manifest

    photos = tmp_path / "photos"
    shutil.copytree(cfg.data.root, photos)
    pairs = read_pairs(photos)
    write_manifest(pairs.assign(caption="a photo of my dog"), photos / PAIRS_FILE)
    user = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(photos)))
    result = json.loads(probe(user).read_text())
    assert set(result) == {"skipped"} and "no one-object scene" in result["skipped"]


@pytest.mark.parametrize("family", ["encoder-decoder", "t5"])
def test_a_generative_family_is_probed_through_its_image_encoder(
    cfg: Config, tmp_path: Path, family: str
) -> None:
    from tests.checkpoints.vlp import IMAGE_SIZE, TEXTS, TRANSFORM
    from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE
    from vlp.models.family import build_from_params
    from vlp.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg.model, family=family, image_tower="vit")
    model = build_from_params(model_cfg, train_tokenizer(TEXTS, 120), 0.07)
    saved = tmp_path / family
    model.save_pretrained(saved, {IMAGE_TRANSFORM_FILE: {**TRANSFORM, "size": IMAGE_SIZE}})
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        states = model.eval().image_states(pixels)
    assert states.shape[0] == 2 and states.shape[1] > 1  # a global token, then the patches
    on = dataclasses.replace(
        cfg,
        model=model_cfg,
        pretrain=dataclasses.replace(cfg.pretrain, out_dir=str(saved)),
    )
    result = json.loads(probe(on).read_text())
    grid = 100.0 / result["n_eval"]
    scores = result["accuracy"]["pretrained"]
    assert set(scores) == set(CLASSES)
    for acc in scores.values():
        assert 0.0 <= acc <= 100.0 and acc / grid == pytest.approx(round(acc / grid))
