"""A smoke config whose stage outputs and MLflow store stay inside a test's folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlp.config import Config


def isolated_cfg(smoke_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """`smoke_cfg` with the pretrained model, metrics, plots and MLflow store under `tmp_path`,
    which becomes the working directory (lineage reads dvc.yaml / dvc.lock from it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return dataclasses.replace(
        smoke_cfg,
        pretrain=dataclasses.replace(
            smoke_cfg.pretrain, out_dir=str(tmp_path / "models" / "pretrained")
        ),
        runtime=dataclasses.replace(
            smoke_cfg.runtime,
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        tracking=dataclasses.replace(
            smoke_cfg.tracking, artifact_root=str(tmp_path / "mlartifacts")
        ),
    )
