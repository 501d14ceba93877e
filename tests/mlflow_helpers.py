"""Helpers for tracking, registry and flow tests: isolated MLflow stores, stand-in models."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from vlp.config import Config
from vlp.tracking import COMMAND_HTTP_LIMITS

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
    # registry commands put these in the process environment: set here, they are undone
    for name, value in COMMAND_HTTP_LIMITS.items():
        monkeypatch.setenv(name, value)
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
    """A stand-in task model directory answering with `word`; its task.json holds the
    settings a generation model's request params default to."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "standin.json").write_text(json.dumps({"word": word}))
    (path / "task.json").write_text(json.dumps({"sample_steps": 2, "guidance_scale": 1.5}))
    return path


def evaluated_metrics(
    model_dir: Path, scores: dict[str, Any], split: str = "test", data_hash: str = "d1"
) -> dict[str, Any]:
    """`scores` as `vlp evaluate` records them: of the model at `model_dir`, on `split` of
    a dataset whose content hash is `data_hash`."""
    from vlp.tasks import model_sha256

    return {
        **scores,
        "model_sha256": model_sha256(model_dir),
        "evaluated_on": {"split": split, "data": "data/shapes", "data_hash": data_hash},
    }


def png_bytes(size: int = 12) -> bytes:
    """A small PNG image, `size` pixels square."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_process(
    cmd: list[str], url: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Iterator[subprocess.Popen]:
    """Run `cmd` until `url` answers 200 (bounded by `timeout`), yield it, always stop it."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"{cmd[:3]} exited {proc.returncode}:\n{log.read().decode()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout}s")
            # readiness poll of an external process; nothing to wait on but the socket
            time.sleep(0.25)
        yield proc
    finally:
        # the server forks workers: stop its whole process group
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()
