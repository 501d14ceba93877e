"""The Prefect flow drives DVC stage by stage; its deployment runs when triggered."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from flows.pipeline import deployment, pipeline_stages, vlp_pipeline
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


def _workspace(repo: Path) -> dict[str, bytes]:
    """Every file of the workspace by content, but git's, DVC's cache (shared with variants)
    and the tracking store."""
    skip = (".git/", "mlflow.db", ".dvc/tmp/", ".dvc/cache/")
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and not str(p.relative_to(repo)).startswith(skip)
    }


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


def test_flow_runs_stages_in_dvc_order_and_leaves_dvc_up_to_date(dvc_repo: Path) -> None:
    assert pipeline_stages(dvc_repo) == ["generate", "train", "flaky"]
    params = (dvc_repo / "params.yaml").read_text()
    results = vlp_pipeline(repo=str(dvc_repo))
    assert [(r["stage"], r["ran"]) for r in results] == [
        ("generate", True),
        ("train", True),
        ("flaky", True),  # failed once, retried
    ]
    assert (dvc_repo / "flaky.marker").exists()
    assert (dvc_repo / "out" / "train.txt").read_text() == "default 0.001"
    assert (dvc_repo / "params.yaml").read_text() == params
    assert "up to date" in _dvc_status(dvc_repo)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dvc_repo / 'mlflow.db'}")
    runs = client.search_runs(["1"], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("vlp.kind") == "pipeline")
    stages = [r for r in runs if r.data.tags.get("vlp.kind") == "stage"]
    assert parent.data.tags["vlp.driver"] == "prefect" and parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.lr"] == "0.001"
    assert [r.info.run_name for r in stages] == ["train"]
    flow_run_id = parent.data.tags["vlp.prefect_flow_run_id"]
    assert flow_run_id and stages[0].data.tags["vlp.prefect_flow_run_id"] == flow_run_id
    assert stages[0].data.tags["mlflow.parentRunId"] == parent.info.run_id

    again = vlp_pipeline(repo=str(dvc_repo))
    assert not any(r["ran"] for r in again)


def test_a_variant_runs_as_a_dvc_experiment_and_leaves_the_workspace_alone(
    dvc_repo: Path,
) -> None:
    vlp_pipeline(repo=str(dvc_repo))  # the workspace's own results
    before = _workspace(dvc_repo)
    assert b"0.001" in before["out/train.txt"] and "dvc.lock" in before

    results = vlp_pipeline(
        repo=str(dvc_repo),
        profile="smoke",
        overrides=["pretrain.lr=0.002"],
        experiment="smoke-lr",
    )
    assert [(r["stage"], r["ran"]) for r in results] == [
        ("generate", False),  # same data params: restored from DVC's run cache, not rerun
        ("train", True),
        ("flaky", True),
    ]
    # params.yaml, outputs, metrics and dvc.lock of the workspace are as they were
    assert _workspace(dvc_repo) == before
    assert "up to date" in _dvc_status(dvc_repo)
    assert _git(dvc_repo, "worktree", "list").count("\n") == 1  # the temporary one is gone

    # the variant is a DVC experiment on HEAD, with its params and metrics
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"],
            cwd=dvc_repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    exps = {
        e["name"]: e
        for baseline in shown
        for e in [baseline, *(x for exp in baseline.get("experiments") or [] for x in exp["revs"])]
    }
    assert "smoke-lr" in exps, sorted(exps)
    data = exps["smoke-lr"]["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["pretrain"]["lr"] == 0.002
    assert params["data"]["n_pretrain"] == 48  # the smoke profile, applied
    assert data["metrics"]["metrics/train.json"]["data"] == {"lr_x1000": 2.0}
    assert "profile" not in params

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dvc_repo / 'mlflow.db'}")
    runs = client.search_runs(["1"], order_by=["attributes.start_time ASC"])
    parent = [r for r in runs if r.data.tags.get("vlp.kind") == "pipeline"][-1]
    train = [r for r in runs if r.info.run_name == "train"][-1]
    assert parent.data.tags["vlp.profile"] == train.data.tags["vlp.profile"] == "smoke"
    assert parent.data.params["pretrain.lr"] == "0.002"
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_bad_override_is_refused_before_any_work(dvc_repo: Path) -> None:
    before = _workspace(dvc_repo)
    with pytest.raises(ConfigError, match="nosuchkey"):
        vlp_pipeline(repo=str(dvc_repo), overrides=["pretrain.nosuchkey=1"])
    assert _workspace(dvc_repo) == before
    assert _git(dvc_repo, "worktree", "list").count("\n") == 1


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
