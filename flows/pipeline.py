"""The vlp pipeline as a Prefect flow that drives DVC, and its cron deployment.

The flow adds orchestration (retries, logs, a schedule, a UI) on top of the one stage
implementation: each Prefect task runs `dvc repro --single-item <stage>` for one
stage of dvc.yaml, in DVC's dependency order. Parameter overrides are written into
params.yaml first (comments kept), as `dvc exp run --set-param` does, so after a flow
run `dvc status` has nothing to do. The flow opens the MLflow pipeline run itself and
hands it to every stage process through `VLP_PARENT_RUN_ID`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from vlp.config import Config, load_config, tracking_uri
from vlp.errors import ConfigError
from vlp.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, end_pipeline_run, start_pipeline_run

# `vlp` marks what retrying cannot fix with this in its message: a user error (bad params,
# bad data; exit 2) or a promotion refused for a person to resolve (exit 4).
USER_ERROR_MARK = ": error: "


class StageFailed(RuntimeError):
    """`dvc repro` of one stage failed; `transient` says whether a retry may help."""

    def __init__(self, stage: str, code: int, tail: str, transient: bool) -> None:
        super().__init__(f"stage {stage} failed (exit {code}):\n{tail}")
        self.transient = transient


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and not exc.transient)


def write_overrides(params: Path, profile: str | None, overrides: list[str]) -> None:
    """Write `profile` and `section.key=value` overrides into params.yaml.

    Checked against the config schema first: a bad key raises ConfigError and leaves
    the file untouched. A round-trip YAML edit keeps comments, quotes and layout.
    """
    import io

    from ruamel.yaml import YAML

    from vlp.io import atomic_write_text

    load_config(params, profile, overrides)
    if not profile and not overrides:
        return
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long lines
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = rt.load(params.read_text())
    if profile:
        data["profile"] = profile
    for item in overrides:
        dotted, text = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(text)
    buf = io.StringIO()
    rt.dump(data, buf)
    atomic_write_text(params, buf.getvalue())


def pipeline_stages(repo: Path) -> list[str]:
    """Names of the dvc.yaml stages of `repo`, upstream first, else in dvc.yaml order."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    # stage addresses are relative to the working directory
    with chdir(repo), Repo(".") as dvc_repo:
        position = {s.addressing: i for i, s in enumerate(dvc_repo.index.stages)}
        # DVC's edges point from a stage to the stages it depends on: reverse them
        order = nx.lexicographical_topological_sort(
            dvc_repo.index.graph.reverse(copy=True), key=lambda s: position.get(s.addressing, -1)
        )
        return [s.addressing for s in order if isinstance(s, PipelineStage)]


@task(name="dvc-stage", task_run_name="{stage}", retry_condition_fn=_retry_if_transient)
def run_stage(stage: str, repo: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item`); skipped by DVC if up to date."""
    log = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log.info("stage %s: %s", stage, " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines()[-40:]:
        log.info("  %s", line)
    if proc.returncode != 0:
        transient = USER_ERROR_MARK not in output
        raise StageFailed(stage, proc.returncode, output[-2000:], transient)
    skipped = "didn't change, skipping" in output
    log.info("stage %s %s in %.1f s", stage, "up to date" if skipped else "ran", seconds)
    return {"stage": stage, "ran": not skipped, "seconds": round(seconds, 2)}


@flow(name="vlp-pipeline", log_prints=True)
def vlp_pipeline(
    params: str = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
    repo: str = ".",
) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline of `repo` stage by stage, under one MLflow pipeline run.

    `profile` and `overrides` (`section.key=value`) are written into params.yaml first.
    """
    import os

    log = get_run_logger()
    root = Path(repo).resolve()
    params_path = root / params if not Path(params).is_absolute() else Path(params)
    write_overrides(params_path, profile, overrides or [])
    with chdir(root):
        cfg = load_config(params_path)
        flow_run_id = str(flow_run.id or "")
        parent = start_pipeline_run(
            cfg, driver="prefect", tags={"vlp.prefect_flow_run_id": flow_run_id}
        )
        uri = _absolute_uri(tracking_uri(cfg), root)
    stages = pipeline_stages(root)
    log.info("profile %s; MLflow run %s; stages: %s", cfg.profile, parent, ", ".join(stages))
    env = {
        **os.environ,
        PARENT_RUN_ENV: parent,
        FLOW_RUN_ENV: flow_run_id,
        "MLFLOW_TRACKING_URI": uri,
    }
    retrying = run_stage.with_options(
        retries=cfg.schedule.retries, retry_delay_seconds=cfg.schedule.retry_delay_s
    )
    results: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for stage in stages:
            results.append(retrying(stage, str(root), env))
        status = "FINISHED"
    finally:
        with chdir(root):
            end_pipeline_run(cfg, parent, status)
    return results


def _absolute_uri(uri: str, root: Path) -> str:
    """A relative `sqlite:///x.db` made absolute, so every stage process shares one store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(root / uri[len(prefix) :])
    return uri


def deployment(cfg: Config, parameters: dict[str, Any] | None = None) -> Any:
    """The scheduled deployment: `vlp_pipeline` on `schedule.cron` in `schedule.timezone`."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    if not cfg.schedule.cron.strip():
        raise ConfigError("schedule.cron is empty")
    return vlp_pipeline.to_deployment(
        name=cfg.schedule.deployment,
        schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
        parameters=parameters or {"repo": str(Path.cwd())},
        # importable by module name from any working directory
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["vlp"],
    )


def serve(cfg: Config) -> None:
    """Serve the scheduled deployment until interrupted (needs a Prefect server)."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(cfg))
