"""MLflow runs for pipeline stages: params, per-step metrics and lineage tags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlp.config import Config, tracking_uri


class StageRun:
    """A live MLflow run of one stage; the only MLflow handle stage code needs."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    *,
    task: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for `stage` (optionally one `task`), closed when the block ends."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    name = f"{stage}-{task}" if task else stage
    all_tags = {"vlp.stage": stage, "vlp.profile": cfg.profile, **(tags or {})}
    if task:
        all_tags["vlp.task"] = task
    with mlflow.start_run(run_name=name, tags=all_tags) as run:
        if params:
            mlflow.log_params(params)
        yield StageRun(run.info.run_id)
