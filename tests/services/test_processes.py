"""Which processes `make services` / `make services-down` treat as the stack's own.

Real processes on loopback: `sleep` stands for a server, a tiny HTTP server that answers 200
to everything for a process squatting a port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.conftest import REPO_ROOT, _free_port
from vlp.errors import ServiceError
from vlp.services import down, main, up, wait_ready
from vlp.stack_processes import Proc, identify, listener_of, running, spawn
from vlp.stack_settings import load_settings

ANSWER_200 = """
import http.server, sys
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Answer)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Proc]:
    """A live process that is not the stack's: it must outlive `down`."""
    proc = spawn(["sleep", "600"], tmp_path, {}, tmp_path / "sleep.log")
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    os.waitpid(proc.pid, 0)


def start_http(port: int = 0) -> tuple[subprocess.Popen, int]:
    """A server answering 200 on 127.0.0.1:`port` (0: any free one), and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ANSWER_200, str(port)], stdout=subprocess.PIPE, text=True
    )
    return proc, int(proc.stdout.readline())


@pytest.fixture
def squatter() -> Iterator[tuple[subprocess.Popen, int]]:
    proc, port = start_http()
    yield proc, port
    _kill(proc)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repo whose stack would run on free ports (nothing here starts it)."""
    shutil.copy(REPO_ROOT / ".env.example", tmp_path / ".env.example")
    shutil.copy(REPO_ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    ports = {"POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT"}
    lines = [
        f"{line.split('=')[0]}={_free_port()}" if line.split("=")[0] in ports else line
        for line in (tmp_path / ".env.example").read_text().splitlines()
    ]
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    return tmp_path


def _record(repo: Path, entries: dict[str, object]) -> Path:
    s = load_settings(repo)
    s.state.mkdir(parents=True, exist_ok=True)
    s.pids_file.write_text(json.dumps(entries))
    return s.pids_file


def test_a_process_is_known_by_its_start_time_and_command_line(tmp_path: Path) -> None:
    proc = spawn(["sleep", "600"], tmp_path, {}, tmp_path / "sleep.log")
    assert proc.cmd == ("sleep", "600") and identify(proc.pid) == proc
    assert running(proc)
    assert not running(Proc(proc.pid, proc.start - 1, proc.cmd))  # an earlier process
    assert not running(Proc(proc.pid, proc.start, ("mlflow", "server")))
    os.kill(proc.pid, signal.SIGKILL)
    os.waitpid(proc.pid, 0)
    assert identify(proc.pid) is None and not running(proc)


@pytest.mark.parametrize("legacy", [False, True], ids=["other-start-time", "bare-pid"])
def test_down_leaves_alone_a_process_that_reuses_a_recorded_pid(
    repo: Path, sleeper, legacy: bool, capsys
) -> None:
    earlier = {"pid": sleeper.pid, "start": sleeper.start - 100, "cmd": ["mlflow", "server"]}
    pids_file = _record(repo, {"mlflow": sleeper.pid if legacy else earlier})
    assert main(["down", "--root", str(repo)]) == 0
    assert running(sleeper)  # not signalled
    out = capsys.readouterr().out
    assert (
        f"left alone (their PIDs now belong to other processes): mlflow (PID {sleeper.pid})" in out
    )
    assert "stopped: none" in out
    assert not pids_file.exists()


def test_down_stops_the_process_group_it_started(repo: Path) -> None:
    s = load_settings(repo)
    server = spawn(["sh", "-c", "sleep 600 & sleep 600"], repo, {}, s.logs / "s3.log")
    _record(repo, {"s3": server.to_json()})
    stopped, stale = down(repo)
    assert stopped == {"s3": server} and stale == {}
    assert not running(server)
    with pytest.raises(ProcessLookupError):  # the child in its group went too
        os.killpg(server.pid, 0)


def test_readiness_is_refused_to_a_server_the_stack_did_not_start(
    sleeper, squatter, tmp_path: Path
) -> None:
    """Our process lives and the URL answers 200, but the answer comes from someone else."""
    holder, port = squatter
    with pytest.raises(ServiceError, match=f"mlflow: port {port} is held by PID {holder.pid} "):
        wait_ready("mlflow", f"http://127.0.0.1:{port}/health", sleeper.pid, tmp_path / "log")


def test_readiness_of_a_server_the_stack_started(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-c", ANSWER_200, str(port)]
    server = spawn(cmd, tmp_path, {}, tmp_path / "server.log")
    try:
        wait_ready("mlflow", f"http://127.0.0.1:{port}/health", server.pid, tmp_path / "log")
        assert listener_of(port, server.pid) is True
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_up_refuses_a_port_in_use_before_starting_anything(repo: Path) -> None:
    port = load_settings(repo).mlflow_port
    holder, _ = start_http(port)
    try:
        with pytest.raises(
            ServiceError, match=f"mlflow: port {port} is already in use by PID {holder.pid} "
        ):
            up(repo)
    finally:
        _kill(holder)
    s = load_settings(repo)
    assert not s.pids_file.exists() and not (s.state / "postgres").exists()
