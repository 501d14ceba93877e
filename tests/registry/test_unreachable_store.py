"""Registry commands against a tracking server that does not answer: one named error, at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.mlflow_helpers import free_port
from vlp.cli import main
from vlp.config import Config
from vlp.errors import TrackingError
from vlp.registry import _alias
from vlp.tracking import COMMAND_HTTP_LIMITS

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")


def _closed_server() -> str:
    """An http:// tracking URI on a loopback port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


def test_a_down_server_is_an_error_not_no_challenger(
    store_cfg: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = _closed_server()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # no retries: the same answer as with them, sooner
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for command in (["promote", "all", "--pipeline"], ["promote", "all"], ["rollback", "vqa"]):
        assert main(["--params", PARAMS, *command]) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"tracking store {uri}: cannot reach it (" in err
    # past the first request too: a failure to answer is never "no such alias"
    with pytest.raises(TrackingError, match=f"tracking store {uri}: cannot reach it"):
        _alias(mlflow.MlflowClient(uri), "vlp-vqa", "challenger")


@pytest.mark.slow  # one `vlp` process per command
@pytest.mark.parametrize(
    "command",
    [
        ["register", "captioning"],
        ["promote", "captioning"],
        ["promote", "all", "--pipeline"],
        ["rollback", "captioning"],
    ],
)
def test_every_registry_command_names_a_down_server_within_seconds(
    store_cfg: Config, command: list[str]
) -> None:
    uri = _closed_server()
    env = {k: v for k, v in os.environ.items() if k not in COMMAND_HTTP_LIMITS}
    # MLflow's own limits (7 retries with backoff) take about 4 minutes per request
    out = subprocess.run(
        [sys.executable, "-m", "vlp.cli", "--params", PARAMS, *command],
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith(f"vlp {command[0]}: error: tracking store {uri}: cannot reach it")
    assert out.stderr.count("\n") == 1
