"""Helpers for tracking, registry and flow tests: isolated MLflow stores, stand-in models."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vlp.config import Config

STANDIN = Path(__file__).resolve().parent / "registry" / "standin_predictor.py"
STANDIN_LOADER = "standin_predictor:load_predictor"


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database, made once and copied per test."""
    import mlflow

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store_cfg(
    smoke_cfg: Config, empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    """smoke_cfg with its own SQLite store and artifact folder; cwd is a fresh git repo."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    git_init(work)
    return dataclasses.replace(
        smoke_cfg,
        tracking=dataclasses.replace(
            smoke_cfg.tracking,
            uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            artifact_root=str(tmp_path / "mlartifacts"),
        ),
    )


def git_init(path: Path) -> str:
    """Make `path` a git repo with one commit; return the commit sha."""
    env = ["-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    (path / "README").write_text("x\n")
    subprocess.run(["git", "add", "README"], cwd=path, check=True)
    subprocess.run(["git", *env, "commit", "-qm", "init"], cwd=path, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_standin_model(path: Path, word: str) -> Path:
    """A stand-in task model directory answering with `word`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "standin.json").write_text(json.dumps({"word": word}))
    return path


def png_bytes(size: int = 12) -> bytes:
    """A small PNG image, `size` pixels square."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
