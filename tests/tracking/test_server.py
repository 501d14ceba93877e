"""The same tracking and registry code against a real `mlflow server` on loopback."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import mlflow
import pytest

from tests.mlflow_helpers import (
    STANDIN,
    STANDIN_LOADER,
    evaluated_metrics,
    free_port,
    http_process,
    make_standin_model,
)
from vlp.config import Config
from vlp.registry import promote, register_model
from vlp.tracking import stage_run

pytestmark = pytest.mark.slow  # an MLflow server and stage subprocesses

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def test_pipeline_against_an_mlflow_server(
    store_cfg: Config, empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copy(empty_store, server_dir / "mlflow.db")  # skips the schema migrations
    cmd = [
        MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
        "--artifacts-destination", str(server_dir / "artifacts"),
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its job runner only slows startup
    with http_process(cmd, f"http://127.0.0.1:{port}/health", env=env, timeout=180):
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with stage_run(store_cfg, "pretrain", params={"lr": 0.1}) as run:
            run.log_metrics({"loss": 1.5}, step=0)
        for word, value in (("a", 0.5), ("b", 0.7)):
            model_dir = make_standin_model(tmp_path / word, word)
            register_model(
                store_cfg,
                "captioning",
                model_dir,
                evaluated_metrics(model_dir, {"CIDEr": value}),
                loader=STANDIN_LOADER,
                extra_code_paths=[STANDIN],
            )
        assert promote(store_cfg, "captioning")["decision"] == "promoted"

        client = mlflow.MlflowClient(tracking_uri=uri)
        stage = client.get_run(run.run_id)
        parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["vlp.kind"] == "pipeline"
        assert stage.data.metrics == {"loss": 1.5}
        assert str(client.get_model_version_by_alias("vlp-captioning", "champion").version) == "2"
    # everything went to the server: its store and artifact folder, none to the local ones
    assert (server_dir / "artifacts").is_dir() and any((server_dir / "artifacts").rglob("*"))
    assert not (tmp_path / "mlartifacts").exists()
    local = dataclasses.replace(store_cfg)
    assert mlflow.MlflowClient(tracking_uri=local.tracking.uri).search_registered_models() == []
