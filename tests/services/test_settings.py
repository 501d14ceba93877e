"""The stack's one env file, and prefect.yaml / .dvc/config agreeing with params and it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from vlp.config import load_config
from vlp.errors import ServiceError
from vlp.services import DVC_REMOTE, ENV_KEYS, load_settings, read_env_file, work_pool

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_env_example_sets_every_key_and_is_copied_to_env(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    assert set(read_env_file(tmp_path / ".env.example")) == set(ENV_KEYS)
    s = load_settings(tmp_path)
    assert (tmp_path / ".env").read_text() == (tmp_path / ".env.example").read_text()
    assert s.state == tmp_path / ".services"
    assert s.mlflow_url == "http://127.0.0.1:55000"
    assert s.pg_url("mlflow").startswith("postgresql://vlp:")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("S3_PORT=59000\n", ""), "missing S3_PORT"),
        (lambda t: t.replace("MLFLOW_PORT=55000", "MLFLOW_PORT=http"), "MLFLOW_PORT='http'"),
        (lambda t: t + "not a setting\n", "expected KEY=VALUE"),
    ],
)
def test_a_bad_env_file_names_the_key(tmp_path: Path, edit, message: str) -> None:
    (tmp_path / ".env").write_text(edit((REPO_ROOT / ".env.example").read_text()))
    with pytest.raises(ServiceError, match=message):
        load_settings(tmp_path)


def test_prefect_yaml_deploys_the_flow_on_the_params_schedule() -> None:
    schedule = load_config(REPO_ROOT / "params.yaml").schedule
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["name"] == schedule.deployment
    assert dep["entrypoint"] == "flows/pipeline.py:vlp_pipeline"
    assert dep["schedules"] == [{"cron": schedule.cron, "timezone": schedule.timezone}]
    assert work_pool(REPO_ROOT) == dep["work_pool"]["name"]


def test_the_dvc_s3_remote_points_at_the_stack_store() -> None:
    from configobj import ConfigObj

    remote = ConfigObj(str(REPO_ROOT / ".dvc" / "config"))[f'remote "{DVC_REMOTE}"']
    env = read_env_file(REPO_ROOT / ".env.example")
    assert remote["url"] == f"s3://{env['DVC_BUCKET']}/vlp"
    assert remote["endpointurl"] == f"http://127.0.0.1:{env['S3_PORT']}"
    assert "secret_access_key" not in remote  # credentials go to .dvc/config.local
