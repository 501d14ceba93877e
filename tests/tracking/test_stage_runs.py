"""Stage runs in a local SQLite store: one parent per pipeline run, nested stages, lineage."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import mlflow
import pytest

from vlp.config import Config
from vlp.tracking import stage_run, start_pipeline_run

LOCK = """
schema: '2.0'
stages:
  generate:
    cmd: vlp generate
    outs:
    - path: data/shapes
      hash: md5
      md5: 0123abcd.dir
"""
DVC_YAML = """
stages:
  generate:
    cmd: vlp generate
    outs: [data/shapes]
  pretrain:
    cmd: vlp pretrain
    deps: [data/shapes/pairs.parquet, vlp/pretrain.py]
  finetune:
    foreach:
      retrieval-scratch: {task: retrieval, init: scratch}
    do:
      cmd: vlp finetune ${item.task} --init ${item.init}
      deps: [data/shapes, vlp/finetune.py]
"""


@pytest.fixture
def cfg(store_cfg: Config) -> Config:
    """store_cfg with a relative data root described by a dvc.yaml/dvc.lock in cwd."""
    Path(".dvc").mkdir()
    Path("dvc.yaml").write_text(DVC_YAML)
    Path("dvc.lock").write_text(LOCK)
    return dataclasses.replace(
        store_cfg, data=dataclasses.replace(store_cfg.data, root="data/shapes")
    )


def _run(run_id: str) -> mlflow.entities.Run:
    return mlflow.MlflowClient().get_run(run_id)


def test_stage_runs_nest_under_one_parent_with_lineage(cfg: Config, tmp_path: Path) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with stage_run(cfg, "pretrain", params={"lr": 0.1}) as pre:
        pre.log_metrics({"loss": 2.0}, step=1)
        pre.log_artifact(artifact)
    with stage_run(cfg, "finetune", task="retrieval", init="scratch") as fin:
        fin.set_tags({"extra": "yes"})

    a, b = _run(pre.run_id), _run(fin.run_id)
    parent_id = a.data.tags["mlflow.parentRunId"]
    assert b.data.tags["mlflow.parentRunId"] == parent_id
    parent = _run(parent_id)
    assert parent.data.tags["vlp.kind"] == "pipeline"
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith(f"pipeline-default-{commit[:7]}")  # smoke_cfg: default
    # the whole config is on the parent, so two pipeline runs compare param by param
    assert parent.data.params["pretrain.max_steps"] == str(cfg.pretrain.max_steps)

    assert b.info.run_name == "finetune-retrieval-scratch"
    assert b.data.tags["vlp.task"] == "retrieval" and b.data.tags["vlp.init"] == "scratch"
    for run in (a, b):
        assert run.data.tags["vlp.git_commit"] == commit
        assert run.data.tags["vlp.git_dirty"] == "false"
        assert run.data.tags["vlp.params_hash"] == cfg.section_hash()
    # what dvc.lock says, under its name: pretrain's data dep lies inside the locked
    # data/shapes output, so that output's hash is recorded
    assert a.data.tags["vlp.dvc_lock.data/shapes/pairs.parquet"] == "0123abcd.dir"
    assert parent.data.tags["vlp.dvc_lock.data/shapes"] == "0123abcd.dir"
    # outside `dvc repro` a run names its dvc.yaml stage, foreach members included
    assert b.data.tags["vlp.dvc_stage"] == "finetune@retrieval-scratch"
    assert b.data.tags["vlp.dvc_lock.data/shapes"] == "0123abcd.dir"
    assert a.data.params == {"lr": "0.1"} and a.data.metrics == {"loss": 2.0}
    # artifacts go to the project's artifact folder, not ./mlruns
    assert list((tmp_path / "mlartifacts").rglob("note.txt"))


def test_new_params_or_dirty_tree_change_the_pipeline_run(cfg: Config) -> None:
    with stage_run(cfg, "pretrain") as first:
        pass
    other = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, lr=0.5))
    with stage_run(other, "pretrain") as second:
        pass
    Path("README").write_text("changed\n")
    with stage_run(cfg, "pretrain") as third:
        pass
    p1, p2, p3 = (_run(r.run_id).data.tags for r in (first, second, third))
    assert p1["mlflow.parentRunId"] != p2["mlflow.parentRunId"]
    assert p1["mlflow.parentRunId"] == p3["mlflow.parentRunId"]
    assert p3["vlp.git_dirty"] == "true"


def test_parent_and_flow_run_come_from_the_environment(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent_id = start_pipeline_run(cfg, driver="prefect")
    monkeypatch.setenv("VLP_PARENT_RUN_ID", parent_id)
    monkeypatch.setenv("VLP_PREFECT_FLOW_RUN_ID", "flow-123")
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    with stage_run(cfg, "pretrain") as run:
        pass
    tags = _run(run.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert tags["vlp.prefect_flow_run_id"] == "flow-123"
    assert tags["vlp.dvc_stage"] == "pretrain"
    # the flow owns its parent run: a stage does not end it
    assert _run(parent_id).info.status == "RUNNING"


def test_a_failing_stage_is_marked_failed(cfg: Config) -> None:
    with pytest.raises(RuntimeError), stage_run(cfg, "pretrain") as run:
        raise RuntimeError("boom")
    child = _run(run.run_id)
    assert child.info.status == "FAILED"
    assert _run(child.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
