"""The pipeline against the team stack: Prefect worker, MLflow on PostgreSQL + S3, DVC on S3.

One smoke pipeline runs through the deployment of prefect.yaml, picked up by a `process`
worker, while a second team member's checkout runs `dvc repro` against the same servers
at the same time; then the records are read straight from PostgreSQL and the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services.conftest import VENV_BIN, Stack, copy_repo, pipeline_env
from vlp.services import DVC_REMOTE
from vlp.stack_settings import client_env, work_pool

# servers, a Prefect worker and two smoke pipelines (the first test waits for them: minutes)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PIPELINE_TIMEOUT_S = 1800


@dataclass
class Pipelines:
    flow_run_id: str
    repo: Path  # ran by the worker (the stack's own repo)
    repo2: Path  # ran by `dvc repro` at the same time


async def _trigger_and_wait(api: str, deployment: str, started: Any) -> Any:
    from prefect.client.orchestration import PrefectClient
    from prefect.flow_runs import wait_for_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # the wait listens to the server's events, which it finds through the settings
    with temporary_settings({PREFECT_API_URL: api}):
        async with PrefectClient(api=api) as client:
            dep = await client.read_deployment_by_name(deployment)
            run = await client.create_flow_run_from_deployment(dep.id)
            started()
            return await wait_for_flow_run(run.id, timeout=PIPELINE_TIMEOUT_S, client=client)


@pytest.fixture(scope="module")
def pipelines(stack: Stack) -> Iterator[Pipelines]:
    """The deployment run by a worker, and `dvc repro` in a second checkout, at once."""
    repo, env = stack.repo, stack.env
    prefect = str(VENV_BIN / "prefect")
    deploy = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], cwd=repo, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    log = repo.parent / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", work_pool(repo), "--type", "process"],
            cwd=repo,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    repo2 = copy_repo(repo.parent / "repo2")
    second: list[subprocess.Popen[str]] = []

    def start_second() -> None:
        second.append(
            subprocess.Popen(
                [str(VENV_BIN / "dvc"), "repro"],
                cwd=repo2,
                env=pipeline_env(client_env(stack.settings), repo2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )

    try:
        api = client_env(stack.settings)["PREFECT_API_URL"]
        flow_run = asyncio.run(_trigger_and_wait(api, "vlp-pipeline/vlp-nightly", start_second))
        output, _ = second[0].communicate(timeout=PIPELINE_TIMEOUT_S)
        assert second[0].returncode == 0, output[-3000:]
        assert flow_run.state.is_completed(), log.read_text()[-5000:]
    finally:
        for proc in second:
            proc.kill()
        os.killpg(worker.pid, signal.SIGINT)  # the worker and any flow process it started
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    yield Pipelines(str(flow_run.id), repo, repo2)


def _query(stack: Stack, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg2

    s = stack.settings
    with psycopg2.connect(s.pg_url(s.mlflow_db)) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def _tags(stack: Stack, run_id: str) -> dict[str, str]:
    return dict(_query(stack, "SELECT key, value FROM tags WHERE run_uuid = %s", run_id))


def test_runs_nested_runs_metrics_and_versions_land_in_postgresql(
    stack: Stack, pipelines: Pipelines
) -> None:
    runs = _query(stack, "SELECT run_uuid, status, artifact_uri FROM runs")
    tags = {run_id: _tags(stack, run_id) for run_id, _, _ in runs}
    parents = [r for r in runs if tags[r[0]].get("vlp.kind") == "pipeline"]
    assert len(parents) == 2 and all(status == "FINISHED" for _, status, _ in parents)
    drivers = sorted(tags[run_id]["vlp.driver"] for run_id, _, _ in parents)
    assert drivers == ["dvc", "prefect"]
    by_prefect = next(r[0] for r in parents if tags[r[0]]["vlp.driver"] == "prefect")
    assert tags[by_prefect]["vlp.prefect_flow_run_id"] == pipelines.flow_run_id

    stages = {
        p[0]: [r for r in runs if tags[r[0]].get("mlflow.parentRunId") == p[0]] for p in parents
    }
    names = {p: sorted(tags[r[0]]["mlflow.runName"] for r in rs) for p, rs in stages.items()}
    assert len(set(map(tuple, names.values()))) == 1  # the same stages under each parent
    assert "pretrain" in names[by_prefect]
    assert {n.split("-")[0] for n in names[by_prefect]} >= {"finetune", "evaluate", "register"}
    for rs in stages.values():
        assert all(status == "FINISHED" for _, status, _ in rs)
        # artifacts are proxied by the server: the store records only its own URI scheme
        assert all(uri.startswith("mlflow-artifacts:/") for _, _, uri in rs)
        steps = _query(
            stack, "SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)", [r[0] for r in rs]
        )
        assert steps[0][0] > 0

    versions = _query(stack, "SELECT name, version, run_id FROM model_versions ORDER BY name")
    models = {name for name, _, _ in versions}
    assert models == {"vlp-retrieval", "vlp-captioning", "vlp-vqa", "vlp-generation"}
    stage_ids = {r[0]: p for p, rs in stages.items() for r in rs}
    for model in models:
        mine = [(v, run) for name, v, run in versions if name == model]
        assert sorted(v for v, _ in mine) == [1, 2]  # both pipelines registered, no clash
        assert {stage_ids[run] for _, run in mine} == set(stages)  # one version per pipeline
    aliases = _query(stack, "SELECT name, alias FROM registered_model_aliases")
    assert {name for name, alias in aliases if alias == "champion"} == models


def test_artifacts_land_in_the_bucket(stack: Stack, pipelines: Pipelines) -> None:
    import boto3

    s = stack.settings
    s3 = boto3.client(
        "s3", endpoint_url=s.s3_url, aws_access_key_id=s.s3_key,
        aws_secret_access_key=s.s3_secret, region_name="us-east-1",
    )  # fmt: skip
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s.mlflow_bucket)
        for obj in page.get("Contents", [])
    ]
    runs = _query(stack, "SELECT run_uuid, artifact_uri FROM runs")
    for run_id, uri in runs:
        prefix = uri.removeprefix("mlflow-artifacts:/").lstrip("/") + "/"
        if _tags(stack, run_id).get("mlflow.runName", "").startswith("evaluate"):
            files = [k for k in keys if k.startswith(prefix)]
            assert any(k.endswith(".json") for k in files), (run_id, prefix)
    # the registered pyfunc models too (MLflow's logged models live under <exp>/models/)
    assert any("/models/" in k and k.endswith("MLmodel") for k in keys)


def _cli(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vlp"), *args], cwd=repo, env=env, capture_output=True, text=True
    )


def test_promote_and_rollback_against_the_server(stack: Stack, pipelines: Pipelines) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.settings.mlflow_url)
    name = "vlp-retrieval"
    champion = client.get_model_version_by_alias(name, "champion").version
    other = "1" if str(champion) == "2" else "2"
    # both pipelines trained the same weights; a version of another model (its hash
    # differs) is only promoted by force, which the server records like any decision
    client.set_model_version_tag(name, other, "vlp.model_sha256", "0" * 64)
    client.set_registered_model_alias(name, "challenger", other)
    done = _cli(pipelines.repo, stack.env, "promote", "retrieval", "--force", "--reason", "test")
    assert done.returncode == 0, done.stderr
    assert client.get_model_version_by_alias(name, "champion").version == other
    done = _cli(pipelines.repo, stack.env, "rollback", "retrieval", "--reason", "test")
    assert done.returncode == 0, done.stderr
    rows = _query(
        stack, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
        name, "champion",
    )  # fmt: skip
    assert [str(v) for (v,) in rows] == [str(champion)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dvc_push_and_pull_round_trip_through_the_bucket(
    stack: Stack, pipelines: Pipelines
) -> None:
    import boto3

    repo, env = pipelines.repo, stack.env
    dvc = str(VENV_BIN / "dvc")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {
        out["path"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"].startswith(("data/", "models/"))
    }
    before = {o: _tree_digest(repo / o) for o in outs}
    assert any(k.endswith(".png") for d in before.values() for k in d)  # images are versioned
    push = subprocess.run([dvc, "push", "-r", DVC_REMOTE], cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert push.returncode == 0, push.stdout + push.stderr
    s = stack.settings
    s3 = boto3.client(
        "s3", endpoint_url=s.s3_url, aws_access_key_id=s.s3_key,
        aws_secret_access_key=s.s3_secret, region_name="us-east-1",
    )  # fmt: skip
    assert s3.list_objects_v2(Bucket=s.dvc_bucket, Prefix="vlp/")["KeyCount"] > 0

    # a machine with nothing: no cache, no outputs
    shutil.rmtree(repo / ".dvc" / "cache")
    for o in outs:
        shutil.rmtree(repo / o) if (repo / o).is_dir() else (repo / o).unlink()
    pull = subprocess.run([dvc, "pull", "-r", DVC_REMOTE], cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert {o: _tree_digest(repo / o) for o in outs} == before
