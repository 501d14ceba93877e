"""Processes that use a fresh SQLite tracking database at the same moment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[2]

# Imports MLflow first, says "ready", then waits for the go byte on stdin: the parent
# releases every process at once, so they all reach the store's first use together.
CHILD = """
import sys
import mlflow
from vlp.config import load_config
from vlp.tracking import stage_run

cfg = load_config(sys.argv[1])
print("ready", flush=True)
sys.stdin.read(1)
with stage_run(cfg, "pretrain") as run:
    run.log_metrics({"x": 1.0})
"""


@pytest.mark.slow
def test_processes_first_using_a_fresh_store_at_once_all_record_runs(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "PYTHONPATH": str(REPO),
    }
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        env.pop(var, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO / "params.yaml")],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("x")
        proc.stdin.close()
    errors = [proc.stderr.read() for proc in procs]
    codes = [proc.wait(timeout=300) for proc in procs]
    assert codes == [0, 0, 0], "\n".join(e[-2000:] for e in errors)

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain"]
    assert len(stages) == 3
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"x": 1.0} for r in stages)
