"""Runs a killed process left RUNNING are closed when their stage next starts; live ones stay."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from vlp.config import Config
from vlp.tracking import connect, stage_run

# opens a stage run (task and init optional), prints its id, then is killed or waits for stdin
WRITER = """
import os, pickle, signal, sys
from vlp.tracking import stage_run

cfg = pickle.loads(bytes.fromhex(sys.argv[1]))
stage, task, end = sys.argv[2], sys.argv[3] or None, sys.argv[4]
with stage_run(cfg, stage, task=task, init="pretrained" if task else None) as run:
    print(run.run_id, flush=True)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


@pytest.fixture
def cfg(store_cfg: Config) -> Config:
    """store_cfg, with this process's MLflow client on its store (as the writers' are)."""
    connect(store_cfg)
    return store_cfg


def _writer(cfg: Config, stage: str, task: str, end: str) -> subprocess.Popen:
    """A process that opens a stage run and is then SIGKILLed ("kill") or waits ("wait")."""
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, pickle.dumps(cfg).hex(), stage, task, end],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def _parent(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"]


def _killed_run(cfg: Config, stage: str, task: str = "") -> str:
    proc = _writer(cfg, stage, task, "kill")
    run_id = proc.stdout.readline().strip()
    assert proc.wait(timeout=120) == -9  # reaped: no zombie left
    assert _status(run_id) == "RUNNING" and _status(_parent(run_id)) == "RUNNING"
    return run_id


def _other_params(cfg: Config) -> Config:
    """`cfg` with other pretrain params: another pipeline run, so another parent."""
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, lr=0.123))


@pytest.mark.slow  # a stage process, killed or waiting
def test_a_fresh_pretrain_closes_the_run_of_a_killed_one(cfg: Config) -> None:
    killed = _killed_run(_other_params(cfg), "pretrain")
    with stage_run(cfg, "pretrain") as fresh:
        pass
    assert _status(killed) == "KILLED"
    assert _status(_parent(killed)) == "KILLED"  # no live child, its process gone
    assert _status(fresh.run_id) == "FINISHED"
    assert _parent(fresh.run_id) != _parent(killed)


@pytest.mark.slow  # a stage process, killed or waiting
def test_a_killed_finetune_and_its_pipeline_run_are_closed_by_the_next_finetune(
    cfg: Config,
) -> None:
    killed = _killed_run(_other_params(cfg), "finetune", "vqa")
    with stage_run(cfg, "evaluate", task="vqa"):
        pass  # another stage leaves it alone
    assert _status(killed) == "RUNNING" and _status(_parent(killed)) == "RUNNING"
    with stage_run(cfg, "finetune", task="retrieval", init="pretrained"):
        pass
    assert _status(killed) == "KILLED"
    assert _status(_parent(killed)) == "KILLED"


@pytest.mark.slow  # a stage process, killed or waiting
def test_runs_of_a_live_process_are_left_running(cfg: Config) -> None:
    proc = _writer(_other_params(cfg), "finetune", "vqa", "wait")
    try:
        live = proc.stdout.readline().strip()
        with stage_run(cfg, "finetune", task="vqa", init="pretrained"):
            pass
        assert _status(live) == "RUNNING" and _status(_parent(live)) == "RUNNING"
    finally:
        proc.stdin.write("done\n")
        proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    assert _status(live) == "FINISHED"


def test_a_run_records_its_process(cfg: Config) -> None:
    with stage_run(cfg, "pretrain") as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.run_id).data.tags
    assert (tags["vlp.host"], tags["vlp.pid"]) == (socket.gethostname(), str(os.getpid()))
    if Path("/proc/self/stat").exists():
        assert tags["vlp.process_start"]


def test_only_runs_whose_process_ended_are_closed(cfg: Config) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    other = _other_params(cfg)
    with stage_run(other, "pretrain") as gone:
        pass
    with stage_run(other, "pretrain") as elsewhere:
        pass
    parent = _parent(gone.run_id)
    client = mlflow.MlflowClient()
    # as a killed process leaves them: RUNNING, naming a process that no longer runs
    for run_id in (gone.run_id, elsewhere.run_id, parent):
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "vlp.pid", str(ended.pid))
    client.set_tag(elsewhere.run_id, "vlp.host", "another-host")  # cannot be checked here
    with stage_run(cfg, "finetune", task="vqa", init="pretrained"):
        pass  # another stage's start leaves them alone
    assert {_status(r) for r in (gone.run_id, elsewhere.run_id, parent)} == {"RUNNING"}
    with stage_run(cfg, "pretrain"):
        pass
    assert _status(gone.run_id) == "KILLED"
    assert _status(elsewhere.run_id) == "RUNNING"
    assert _status(parent) == "RUNNING"  # a child may still be alive on another host
    client.set_tag(elsewhere.run_id, "vlp.host", socket.gethostname())
    with stage_run(cfg, "pretrain"):
        pass
    assert _status(elsewhere.run_id) == "KILLED" and _status(parent) == "KILLED"
