"""Stages refuse to start when an output folder or the tracking store cannot be written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlp.cli import main
from vlp.config import Config
from vlp.errors import OutputError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A file where a folder is expected: unwritable for every user, root included."""
    path = tmp_path / "blocker"
    path.write_text("not a folder\n")
    return path


def _with(cfg: Config, section: str, **changes: str) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def test_pretrain_stops_before_training_on_an_unwritable_metrics_dir(
    store_cfg, smoke_data, blocker, tmp_path
):
    from vlp.pretrain import pretrain

    cfg = _with(store_cfg, "pretrain", out_dir=str(tmp_path / "models" / "pretrained"))
    cfg = _with(cfg, "runtime", metrics_dir=str(blocker / "metrics"))
    with pytest.raises(OutputError, match=rf"runtime\.metrics_dir: cannot write in {blocker}"):
        pretrain(cfg)
    assert not (tmp_path / "models").exists()  # refused up front, nothing trained


@pytest.mark.parametrize(
    ("stage", "section", "key"),
    [
        ("finetune", "finetune", "out_dir"),
        ("finetune", "runtime", "plots_dir"),
        ("evaluate", "evaluate", "results_dir"),
        ("evaluate", "runtime", "metrics_dir"),
        ("register", "tracking", "artifact_root"),
    ],
)
def test_stages_name_an_unwritable_output(store_cfg, blocker, stage, section, key):
    from vlp.evaluate import evaluate
    from vlp.finetune import finetune
    from vlp.registry import register_task_models

    run = {
        "finetune": lambda c: finetune(c, "retrieval"),
        "evaluate": lambda c: evaluate(c, "retrieval"),
        "register": lambda c: register_task_models(c, "retrieval"),
    }[stage]
    cfg = _with(store_cfg, section, **{key: str(blocker / "sub")})
    with pytest.raises(OutputError, match=rf"{section}\.{key}: cannot write in {blocker}"):
        run(cfg)


def test_unwritable_sqlite_store_is_one_line_exit_2(store_cfg, blocker, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    code = main(["--params", str(REPO_PARAMS), "--profile", "smoke", "register", "retrieval"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"tracking store sqlite:///{blocker}/mlflow.db: cannot write in {blocker}" in err
    assert err.count("\n") == 1
