"""What the running stack shows other local users and other web origins, and `up` again."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.services.conftest import Stack, services
from vlp.services import read_pids
from vlp.stack_processes import running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _preflight(url: str, origin: str) -> tuple[int, str | None]:
    """Status and Access-Control-Allow-Origin of a browser's CORS preflight from `origin`."""
    request = urllib.request.Request(
        url, method="OPTIONS", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Access-Control-Allow-Origin")


def test_no_command_line_holds_a_password(stack: Stack) -> None:
    s = stack.settings
    secrets = {s.pg_password, quote(s.pg_password, safe=""), s.s3_secret}
    leaks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(secret in text for secret in secrets):
            leaks.append(text.replace("\0", " ")[:200])
    assert leaks == []


def test_secret_files_are_readable_by_their_owner_only(stack: Stack) -> None:
    assert (stack.repo / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600


def test_prefect_answers_browsers_of_its_own_origin_only(stack: Stack) -> None:
    api = f"{stack.settings.prefect_url}/api/flow_runs/filter"
    own = stack.settings.prefect_url
    assert _preflight(api, own) == (200, own)
    status, allowed = _preflight(api, "http://evil.example")
    assert status >= 400 and allowed is None


def test_up_again_keeps_the_running_servers(stack: Stack) -> None:
    before = read_pids(stack.settings)
    done = services(stack.repo, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_pids(stack.settings) == before
    assert all(running(proc) for proc in before.values())


def test_mlflow_keeps_its_records_in_postgresql(stack: Stack) -> None:
    """The backend store URI reaches the server through its environment, and it is used."""
    import psycopg2
    from mlflow import MlflowClient

    experiment_id = MlflowClient(stack.settings.mlflow_url).create_experiment("exposure-check")
    s = stack.settings
    with psycopg2.connect(s.pg_url(s.mlflow_db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment_id),))
        assert cur.fetchall() == [("exposure-check",)]
