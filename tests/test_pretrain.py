"""The pretrain stage on the smoke profile: model dir, metrics, plot CSV and an MLflow run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from vlp.config import Config
from vlp.pretrain import pretrain, recall_at_k


@pytest.fixture
def cfg(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # lineage reads dvc.yaml / dvc.lock from the working dir
    return dataclasses.replace(
        smoke_cfg,
        pretrain=dataclasses.replace(
            smoke_cfg.pretrain, out_dir=str(tmp_path / "models" / "pretrained")
        ),
        evaluate=dataclasses.replace(
            smoke_cfg.evaluate,
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        tracking=dataclasses.replace(
            smoke_cfg.tracking, artifact_root=str(tmp_path / "mlartifacts")
        ),
    )


def test_pretrain_writes_model_metrics_plots_and_run(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    from vlp.models import VLPModel

    out = pretrain(cfg)
    model = VLPModel.from_pretrained(out)
    assert model.loss_weights == {"itc": 1.0, "itm": 1.0, "lm": 1.0}

    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == cfg.pretrain.max_steps
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert metrics[f"{key}_first"] > 0 and metrics[f"{key}_last"] > 0
    for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"):
        assert 0.0 <= metrics[f"zeroshot_{key}"] <= 100.0
    assert metrics["zeroshot_chance_t2i_r1"] == pytest.approx(100 / cfg.data.n_test)

    rows = list(csv.DictReader((tmp_path / "plots" / "pretrain_loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.pretrain.max_steps + 1))
    assert set(rows[0]) == {"step", "loss", "loss_itc", "loss_itm", "loss_lm", "lr"}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("vlp.stage") == "pretrain"
    ]
    history = client.get_metric_history(run.info.run_id, "loss_itc")
    assert [m.step for m in history] == list(range(1, cfg.pretrain.max_steps + 1))
    assert run.data.params["pretrain.lr"] == str(cfg.pretrain.lr)
    assert "vlp.git_commit" in run.data.tags


def test_pretrain_resume_continues_from_checkpoint(cfg: Config, tmp_path: Path) -> None:
    from vlp.train.checkpoint import list_checkpoints

    pretrain(cfg)
    ckpts = list_checkpoints(
        Path(cfg.pretrain.out_dir).parent / "checkpoints" / "pretrained" / "checkpoints"
    )
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    longer = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, max_steps=6))
    with pytest.raises(Exception, match="max_steps"):  # a changed schedule cannot resume
        pretrain(longer, resume=True)
    pretrain(cfg, resume=True)  # already complete: nothing left to train, outputs rewritten
    assert json.loads((tmp_path / "metrics" / "pretrain.json").read_text())["steps"] == 4


def test_recall_at_k_counts_best_caption_per_image() -> None:
    import torch

    # 2 images, 4 captions (2 each); image 0's best caption is its own, image 1's is not.
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.8, 0.7, 0.6, 0.1]])
    t2i = torch.tensor([0, 0, 1, 1])
    r = recall_at_k(sim, t2i, ks=(1, 2))
    assert r["i2t_r1"] == 50.0 and r["i2t_r2"] == 50.0  # image 1's own captions rank 3rd, 4th
    # t2i: caption0->img0 ok, caption1->img1 wins (wrong), caption2->img1 ok, caption3->img0 wins
    assert r["t2i_r1"] == 50.0 and r["t2i_r2"] == 100.0
