"""The Prefect flow drives DVC stage by stage; its deployment runs when triggered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.pipeline import deployment, pipeline_stages, vlp_pipeline, write_overrides
from vlp.config import load_config
from vlp.errors import ConfigError

pytestmark = pytest.mark.slow  # the Prefect flow, a Prefect server and `dvc repro` subprocesses


def _dvc_status(repo: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_flow_runs_stages_in_dvc_order_and_leaves_dvc_up_to_date(dvc_repo: Path) -> None:
    assert pipeline_stages(dvc_repo) == ["generate", "train", "flaky"]
    before = (dvc_repo / "params.yaml").read_text().splitlines()
    results = vlp_pipeline(repo=str(dvc_repo), profile="smoke", overrides=["pretrain.lr=0.002"])
    assert [(r["stage"], r["ran"]) for r in results] == [
        ("generate", True),
        ("train", True),
        ("flaky", True),  # failed once, retried
    ]
    assert (dvc_repo / "flaky.marker").exists()
    assert (dvc_repo / "out" / "train.txt").read_text() == "smoke 0.002"
    params = (dvc_repo / "params.yaml").read_text()
    assert yaml.safe_load(params)["profile"] == "smoke"
    expected = yaml.safe_load("\n".join(before))
    expected["profile"], expected["pretrain"]["lr"] = "smoke", 0.002
    assert yaml.safe_load(params) == expected
    # comments and layout survive the edit
    assert [line for line in before if "#" in line] == [
        line for line in params.splitlines() if "#" in line
    ]
    assert "  lr: 0.002" in params.splitlines()
    assert "up to date" in _dvc_status(dvc_repo)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dvc_repo / 'mlflow.db'}")
    runs = client.search_runs(["1"], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("vlp.kind") == "pipeline")
    stages = [r for r in runs if r.data.tags.get("vlp.kind") == "stage"]
    assert parent.data.tags["vlp.driver"] == "prefect" and parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.lr"] == "0.002"
    assert [r.info.run_name for r in stages] == ["train"]
    flow_run_id = parent.data.tags["vlp.prefect_flow_run_id"]
    assert flow_run_id and stages[0].data.tags["vlp.prefect_flow_run_id"] == flow_run_id
    assert stages[0].data.tags["mlflow.parentRunId"] == parent.info.run_id

    again = vlp_pipeline(repo=str(dvc_repo))
    assert not any(r["ran"] for r in again)


def test_bad_override_is_refused_before_touching_params(dvc_repo: Path) -> None:
    before = (dvc_repo / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="nosuchkey"):
        write_overrides(dvc_repo / "params.yaml", None, ["pretrain.nosuchkey=1"])
    assert (dvc_repo / "params.yaml").read_text() == before


def test_served_deployment_runs_once_when_triggered(dvc_repo: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    cfg = load_config(dvc_repo / "params.yaml")
    dep = deployment(cfg, parameters={"repo": str(dvc_repo)})
    assert dep.schedules[0].schedule.cron == cfg.schedule.cron

    async def serve_once() -> str:
        runner = Runner(name="vlp-test-runner")
        await runner.add_deployment(dep)
        flow_run = await run_deployment(
            f"vlp-pipeline/{cfg.schedule.deployment}", timeout=0, poll_interval=1
        )
        await asyncio.wait_for(runner.start(run_once=True), timeout=300)
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state.type.value

    assert asyncio.run(serve_once()) == "COMPLETED"
    assert (dvc_repo / "out" / "flaky.txt").exists()
    assert "up to date" in _dvc_status(dvc_repo)
