"""Fixtures shared by the whole suite."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from vlp.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread per test process (and the `vlp` subprocesses it starts), set before
# torch is imported. The tests' models are tiny: a second thread buys nothing, and on busy
# cores (other jobs, or one pytest-xdist worker per core) torch's OpenMP threads spin-wait
# for each other, which made the fast tier use twice the CPU time. An explicit
# OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No usage reports from the DVC commands the tests run (each would start a `dvc daemon`).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

IN_MEMORY_TMP = Path("/dev/shm")
IN_MEMORY_TMP_MIN_FREE = 8 * 2**30


def _tmp_in_memory() -> None:
    """Temporary folders (pytest's tmp_path, and those of the processes tests start) in
    memory, where the machine has a large enough /dev/shm and TMPDIR is not set.

    The tests commit to SQLite stores, git and DVC repos thousands of times; each commit
    waits for the disk (fsync), which on a busy disk took ~0.1 s, more than its CPU time.
    """
    if "TMPDIR" in os.environ or not os.access(IN_MEMORY_TMP, os.W_OK | os.X_OK):
        return
    if shutil.disk_usage(IN_MEMORY_TMP).free < IN_MEMORY_TMP_MIN_FREE:
        return
    os.environ["TMPDIR"] = str(IN_MEMORY_TMP)
    tempfile.tempdir = None  # computed again, from TMPDIR, at its next use


_tmp_in_memory()

# Session servers that one process starts for all its tests: the tests using one run on a
# single pytest-xdist worker (`--dist loadgroup`), so the server starts once, and never
# beside a second copy of itself (the team stack's PostgreSQL; Prefect's home folder).
SERIAL_FIXTURES = {"stack": "team-stack", "prefect_server": "prefect-server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in SERIAL_FIXTURES.items():
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smoke_cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The repo's params.yaml with profile `smoke`, every output path inside a session tmp dir.

    Labelled `default`: its runs and registered model names are the default pipeline's,
    each test having its own store. Shared by the whole session: do not mutate it; derive
    a copy with `dataclasses.replace`.
    """
    root = tmp_path_factory.mktemp("smoke")
    cfg = load_config(REPO_ROOT / "params.yaml", profile="smoke")
    pretrained, finetuned = str(root / "models" / "pretrained"), str(root / "models" / "finetuned")
    return dataclasses.replace(
        cfg,
        profile="default",
        runtime=dataclasses.replace(
            cfg.runtime, metrics_dir=str(root / "metrics"), plots_dir=str(root / "plots")
        ),
        data=dataclasses.replace(cfg.data, root=str(root / "data" / "shapes")),
        validate=dataclasses.replace(cfg.validate, report_dir=str(root / "reports" / "validation")),
        pretrain_vision=dataclasses.replace(
            cfg.pretrain_vision, out_dir=str(root / "models" / "pretrained_vision")
        ),
        pretrain=dataclasses.replace(cfg.pretrain, out_dir=pretrained),
        finetune=dataclasses.replace(cfg.finetune, init_dir=pretrained, out_dir=finetuned),
        evaluate=dataclasses.replace(
            cfg.evaluate, models_dir=finetuned, results_dir=str(root / "results")
        ),
        tracking=dataclasses.replace(
            cfg.tracking,
            uri=f"sqlite:///{root / 'mlflow.db'}",
            artifact_root=str(root / "mlartifacts"),
        ),
    )


@pytest.fixture(scope="session")
def smoke_data(smoke_cfg: Config) -> Path:
    """The smoke shapes dataset (smoke_cfg.data.root), generated once per session; read-only."""
    from vlp.data.shapes import generate_dataset

    return generate_dataset(smoke_cfg.data, Path(smoke_cfg.data.root))


@pytest.fixture(scope="session")
def smoke_pretrained(
    smoke_cfg: Config, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A smoke-profile pretrained model directory, trained once per session; read-only."""
    from vlp.pretrain import pretrain

    root = tmp_path_factory.mktemp("smoke_pretrained")
    cfg = dataclasses.replace(
        smoke_cfg,
        pretrain=dataclasses.replace(smoke_cfg.pretrain, out_dir=str(root / "pretrained")),
        runtime=dataclasses.replace(
            smoke_cfg.runtime, metrics_dir=str(root / "metrics"), plots_dir=str(root / "plots")
        ),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        return pretrain(cfg)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd with its own MLflow store (sqlite), outside any DVC project (`vlp zeroshot`, `vlp
    embed` and other commands run outside a pipeline)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    return work
