"""MLflow runs for pipeline stages: params, per-step metrics and lineage tags.

Every stage run is nested under one *pipeline run* (the parent). Which parent:

1. `VLP_PARENT_RUN_ID` in the environment (set by the Prefect flow, which creates the
   parent itself and passes it down through `dvc repro` to every stage process);
2. else the run active in this process, if any;
3. else the parent is found-or-created by a *pipeline key*: hash of git commit, params
   hash and data hash. Each `dvc repro` stage is a separate `vlp ...` process; they all
   compute the same key and so land under the same parent without any shared state.

Every run carries the lineage tags of `vlp.lineage`: what it read, the pipeline's
dvc.lock entries, and the process that writes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlp.config import Config, tracking_uri
from vlp.errors import ConfigError, OutputError, TrackingError
from vlp.io import check_writable
from vlp.lineage import (
    DVC_STAGE_ENV,
    close_abandoned_runs,
    input_tags,
    lineage_tags,
    pipeline_key,
    process_tags,
    profile_label,
)

PARENT_RUN_ENV = "VLP_PARENT_RUN_ID"

TAG_KIND = "vlp.kind"
TAG_PIPELINE_KEY = "vlp.pipeline_key"
TAG_RESUMED_FROM = "vlp.resumed_from_run_id"
TAG_RESUMED_BY = "vlp.resumed_by_run_id"
# MLflow's own HTTP defaults (7 retries, exponential backoff from 2 s, 120 s a request) make
# a registry command wait minutes for a server that is down; these bound it to seconds. A
# value already set in the environment wins.
COMMAND_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# a store answering one of these has the store's answer: the thing asked for is not there
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts ("@" is not allowed): `i2t_R@1` -> `i2t_R_at_1`."""
    return name.replace("@", "_at_")


class StageRun:
    """A live MLflow run of one stage; the only MLflow handle stage code needs.

    Metric names are logged through `mlflow_key`, so stages keep their own names.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_steps(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log many steps' metrics at once: one store round trip per 1000 values.

        A per-step `log_metrics` costs ~40 ms on a sqlite store; training loops buffer
        steps and flush them here.
        """
        import time

        import mlflow
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [
            Metric(mlflow_key(k), float(v), ts, step) for step, row in rows for k, v in row.items()
        ]
        client = mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def flat_params(cfg: Config) -> dict[str, str]:
    """The whole config as `section.key -> value`, for side-by-side comparison in the UI."""

    def walk(prefix: str, node: Any, out: dict[str, str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v, out)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, list | type(None)) else str(node)

    out: dict[str, str] = {}
    walk("", cfg.to_dict(), out)
    return out


# ---------------------------------------------------------------- runs


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local tracking store (`sqlite:///x.db`, `file:...`, a path)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri)
    return None


def check_stage_outputs(cfg: Config, outputs: dict[str, Path]) -> None:
    """OutputError unless every output folder and the local tracking store can be written.

    Called by each stage before it trains or evaluates, so that no work is lost to a
    read-only folder at the end. `outputs` maps a label (the params key) to a folder.
    """
    locations = dict(outputs)
    uri = tracking_uri(cfg)
    store = _local_store(uri)
    if store is not None:
        # a SQLite database also needs its folder for journal files; a file store is a folder
        locations[f"tracking store {uri}"] = store.parent if uri.startswith("sqlite:") else store
        locations["tracking.artifact_root"] = Path(cfg.tracking.artifact_root)
    check_writable(locations)
    if store is not None and uri.startswith("sqlite:") and store.exists():
        try:
            with open(store, "r+b"):
                pass
        except OSError as e:
            raise OutputError(
                f"tracking store {store}: cannot write it ({e.strerror or e})"
            ) from None


_READY_STORES: set[str] = set()  # tracking URIs this process has already connected to


def connect(cfg: Config) -> str:
    """Point MLflow at the configured tracking store; return its URI.

    MLflow creates and migrates a fresh SQLite database on its first connection without
    any lock, so two processes starting at once on a new database both migrate it and one
    fails ("duplicate column name"). The first connection of each process is therefore
    made under a file lock beside the database: one process migrates, the others wait
    and find the tables ready.
    """
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if uri not in _READY_STORES and uri.startswith("sqlite:///"):
        from filelock import FileLock

        db = _local_store(uri.split("?")[0])
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock"):
            _open_store(uri, db)
    _READY_STORES.add(uri)
    return uri


def _open_store(uri: str, db: Path) -> None:
    """Connect to (and create or migrate) the SQLite store; ConfigError if it is not one."""
    import mlflow
    from sqlalchemy.exc import SQLAlchemyError

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except SQLAlchemyError as e:
        # the driver's first line says what is wrong ("file is not a database"); the rest is SQL
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise ConfigError(
            f"tracking store {uri}: {db} is not an MLflow database ({reason})"
        ) from None


def store_error(uri: str, error: Exception) -> TrackingError:
    """A TrackingError naming the store and, in a few words, why it did not answer."""
    text = " ".join(str(error).split())
    reason = re.search(r"\[Errno -?\d+\] [^'\")]+|timed? ?out", text)
    why = reason.group(0) if reason else text[:200]
    return TrackingError(
        f"tracking store {uri}: cannot reach it ({why}); start it, or set "
        "MLFLOW_TRACKING_URI (or tracking.uri) to a store that answers"
    )


def connect_for_command(cfg: Config) -> str:
    """`connect` for a short command (register, promote, rollback); return the store's URI.

    MLflow's HTTP retries and timeouts are bounded (`COMMAND_HTTP_LIMITS`) and the store
    is asked once: one that does not answer is a TrackingError naming it, within seconds.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    for name, value in COMMAND_HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    uri = tracking_uri(cfg)
    try:
        connect(cfg)
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as e:
        raise store_error(uri, e) from None
    return uri


def setup_mlflow(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    With a local (non-HTTP) store the experiment is created with its artifacts in
    `tracking.artifact_root` inside the project; a server decides its own artifact store.
    """
    import mlflow

    uri = connect(cfg)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            location = Path(cfg.tracking.artifact_root).resolve().as_uri()
        try:
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # another stage process created it first
            exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def pipeline_run_name(cfg: Config, commit: str, key: str) -> str:
    """A parent-run name that tells pipeline runs apart at a glance in the UI."""
    return f"pipeline-{profile_label(cfg)}-{commit[:7]}-{key[:6]}"


def start_pipeline_run(
    cfg: Config, driver: str, key: str | None = None, tags: dict[str, str] | None = None
) -> str:
    """Create a new parent run (status RUNNING) with the whole config as params; return its id."""
    import mlflow

    exp_id = setup_mlflow(cfg)
    key = key or pipeline_key(cfg)
    tags = {
        **lineage_tags(cfg),
        **process_tags(),
        TAG_KIND: "pipeline",
        TAG_PIPELINE_KEY: key,
        "vlp.driver": driver,
        **(tags or {}),
    }
    client = mlflow.MlflowClient()
    run = client.create_run(
        exp_id, run_name=pipeline_run_name(cfg, tags["vlp.git_commit"], key), tags=tags
    )
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def end_pipeline_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    """Mark a parent run finished (or FAILED)."""
    import mlflow

    connect(cfg)
    mlflow.MlflowClient().set_terminated(run_id, status=status)


def find_or_create_pipeline_run(cfg: Config) -> tuple[str, bool]:
    """(parent run id, whether this process owns its status) for the current pipeline run."""
    import mlflow

    if run_id := os.environ.get(PARENT_RUN_ENV):
        return run_id, False
    exp_id = setup_mlflow(cfg)
    key = pipeline_key(cfg)
    found = mlflow.MlflowClient().search_runs(
        [exp_id],
        filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id, True
    return start_pipeline_run(cfg, driver="dvc", key=key), True


def log_to_pipeline_run(cfg: Config, run_id: str, metrics: dict[str, float]) -> None:
    """Log summary metrics (e.g. each task's primary metric) on the parent run."""
    import mlflow

    connect(cfg)
    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        client.log_metric(run_id, mlflow_key(k), float(v))


def link_resumed(earlier_id: str, run_id: str) -> None:
    """Tag a resumed run and the interrupted one with each other's id.

    An interrupted run still RUNNING belongs to a process that died without closing it
    (killed): it is marked KILLED. An id this store does not know is left alone.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        earlier = client.get_run(earlier_id)
    except MlflowException:
        return
    if earlier.info.status == "RUNNING":
        client.set_terminated(earlier_id, status="KILLED")
    client.set_tag(earlier_id, TAG_RESUMED_BY, run_id)
    client.set_tag(run_id, TAG_RESUMED_FROM, earlier_id)


@contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    *,
    task: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    init: str | None = None,
    resumes: str | None = None,
    inputs: dict[str, tuple[str | os.PathLike, str]] | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for `stage` (optionally one `task`), nested under the pipeline run.

    `init` ("pretrained" | "scratch") is recorded as `vlp.init` and in the run name.
    `resumes` is the id of an interrupted run this one continues (see `link_resumed`).
    `inputs` names what the stage read, with the content hashes it computed (`input_tags`).
    Runs of this stage that a killed process left RUNNING are closed first
    (`close_abandoned_runs`).
    """
    import mlflow

    exp_id = setup_mlflow(cfg)
    close_abandoned_runs(exp_id, stage)
    # outside `dvc repro`: the name dvc.yaml gives this stage (`finetune@vqa-scratch`)
    member = "-".join(p for p in (task, init) if p)
    dvc_stage = os.environ.get(DVC_STAGE_ENV) or (f"{stage}@{member}" if member else stage)
    active = mlflow.active_run()
    if active is not None:
        parent_id, owns_parent = active.info.run_id, False
    else:
        parent_id, owns_parent = find_or_create_pipeline_run(cfg)
    client = mlflow.MlflowClient()
    if owns_parent:
        client.update_run(parent_id, status="RUNNING")
    name = "-".join(p for p in (stage, task, init) if p)
    all_tags = {
        **lineage_tags(cfg, dvc_stage),
        **input_tags(inputs or {}),
        **process_tags(),
        TAG_KIND: "stage",
        "vlp.stage": stage,
        **({"vlp.task": task} if task else {}),
        **({"vlp.init": init} if init else {}),
        **(tags or {}),
    }
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=name, parent_run_id=parent_id, tags=all_tags) as run:
            if resumes:
                link_resumed(resumes, run.info.run_id)
            if params:
                mlflow.log_params(params)
            yield StageRun(run.info.run_id)
        status = "FINISHED"
    finally:
        if owns_parent:
            # The parent's status follows its latest stage; the next stage reopens it.
            client.set_terminated(parent_id, status=status)
