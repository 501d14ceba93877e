"""The stack's one env file, and prefect.yaml / .dvc/config agreeing with params and it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from vlp.config import load_config
from vlp.errors import ServiceError
from vlp.services import (
    DVC_REMOTE,
    configure_dvc_remote,
    main,
    mlflow_command,
    prefect_command,
)
from vlp.stack_settings import (
    ENV_KEYS,
    PLACEHOLDER,
    SECRET_KEYS,
    load_settings,
    read_env_file,
    secret_warnings,
    work_pool,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_env_is_made_from_the_example_with_random_secrets_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    example = read_env_file(tmp_path / ".env.example")
    assert set(example) == set(ENV_KEYS)
    assert {example[key] for key in SECRET_KEYS} == {PLACEHOLDER}
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        s = load_settings(tmp_path)
    finally:
        os.umask(old_umask)
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    env = read_env_file(tmp_path / ".env")
    assert {k: v for k, v in env.items() if k not in SECRET_KEYS} == {
        k: v for k, v in example.items() if k not in SECRET_KEYS
    }
    assert s.pg_password == env["POSTGRES_PASSWORD"] and s.s3_secret == env["S3_SECRET_ACCESS_KEY"]
    assert len(s.pg_password) >= 32 and s.pg_password not in (s.s3_secret, PLACEHOLDER)
    assert secret_warnings(tmp_path) == []
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(REPO_ROOT / ".env.example", other / ".env.example")
    assert load_settings(other).pg_password != s.pg_password
    assert s.state == tmp_path / ".services"
    assert s.mlflow_url == "http://127.0.0.1:55000"
    assert s.pg_url("mlflow").startswith("postgresql://vlp:")


def test_placeholder_secrets_and_an_env_file_others_can_read_are_warned_about(
    tmp_path: Path, capsys
) -> None:
    (tmp_path / ".env").write_text((REPO_ROOT / ".env.example").read_text())
    (tmp_path / ".env").chmod(0o644)
    assert main(["env", "--root", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for key in SECRET_KEYS:
        assert f"warning: {tmp_path / '.env'}: {key} is the placeholder of .env.example" in err
    assert "readable by other users (mode 644)" in err


def test_the_dvc_remote_credentials_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    s = load_settings(tmp_path)
    local = tmp_path / ".dvc" / "config.local"
    local.parent.mkdir()
    local.write_text("[core]\n    autostage = true\n")
    local.chmod(0o644)
    old_umask = os.umask(0)
    try:
        configure_dvc_remote(s, tmp_path)
    finally:
        os.umask(old_umask)
    assert local.stat().st_mode & 0o777 == 0o600
    from configobj import ConfigObj

    conf = ConfigObj(str(local))
    assert conf["core"] == {"autostage": "true"}
    assert conf[f'remote "{DVC_REMOTE}"']["secret_access_key"] == s.s3_secret


def test_database_passwords_reach_the_servers_through_their_environment_only(
    tmp_path: Path,
) -> None:
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    s = load_settings(tmp_path)
    mlflow_cmd, mlflow_env = mlflow_command(s)
    prefect_cmd, prefect_env = prefect_command(s)
    for cmd in (mlflow_cmd, prefect_cmd):
        assert not [arg for arg in cmd if s.pg_password in arg or quote(s.pg_password) in arg]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == s.pg_url(s.mlflow_db, "postgresql+psycopg2")
    assert s.pg_password in prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_prefect_accepts_browser_requests_from_its_own_origin_only(
    tmp_path: Path, monkeypatch
) -> None:
    """The variable is a setting of the installed Prefect and names the server's own URLs."""
    from prefect.settings import Settings as PrefectSettings

    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    _, env = prefect_command(load_settings(tmp_path))
    origins = env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    assert origins.split(",") == ["http://127.0.0.1:54200", "http://localhost:54200"]
    monkeypatch.setenv("PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", origins)
    assert PrefectSettings().server.api.cors_allowed_origins == origins


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
