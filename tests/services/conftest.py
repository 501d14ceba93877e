"""The team stack (vlp.services) on free loopback ports, with smoke-profile repos to run in."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlp.services import read_pids
from vlp.stack_settings import Settings, client_env, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _bench_module():
    """benchmarks/bench_flow_overhead.py, whose `copy_repo` makes a fresh smoke-profile repo."""
    path = REPO_ROOT / "benchmarks" / "bench_flow_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_flow_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_repo(dest: Path) -> Path:
    """A git + DVC repo at `dest` with this checkout's files and the smoke profile applied."""
    dest.mkdir(parents=True)
    return _bench_module().copy_repo(dest, "smoke")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """Whether `pid` runs: an exited process waiting for init to reap it (a zombie) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class Stack:
    repo: Path  # the repo the stack was started from (its .env, .services/)
    settings: Settings
    env: dict[str, str]  # a pipeline process's environment, pointed at the stack
    up_seconds: float


def services(repo: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlp.services", action, "--root", str(repo)],
        capture_output=True,
        text=True,
        cwd=repo,
    )


def pipeline_env(stack_env: dict[str, str], repo: Path) -> dict[str, str]:
    """The environment of a team member's shell in `repo`: the venv, the repo's code, the stack."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VLP_", "PREFECT_"))}
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = str(repo)
    out["PWD"] = str(repo)
    return {**out, **stack_env}


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """`python -m vlp.services up` in a fresh smoke repo on free ports; `down` at the end,
    which must leave none of the recorded processes (nor their process groups) alive."""
    # PostgreSQL runs as its own user: the folders it lives in must be reachable to it
    base = Path(tempfile.mkdtemp(prefix="vlp-stack-"))
    base.chmod(0o755)
    repo = copy_repo(base / "repo")
    lines = (repo / ".env.example").read_text().splitlines()
    ports = {"POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT"}
    env_lines = [
        f"{line.split('=')[0]}={_free_port()}" if line.split("=")[0] in ports else line
        for line in lines
    ]
    (repo / ".env").write_text("\n".join(env_lines) + "\n")
    start = time.perf_counter()
    done = services(repo, "up")
    up_seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    settings = load_settings(repo)
    pids = read_pids(settings)
    assert set(pids) == {"postgres", "s3", "mlflow", "prefect"}
    try:
        yield Stack(repo, settings, pipeline_env(client_env(settings), repo), up_seconds)
    finally:
        down = services(repo, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not read_pids(settings)
        assert not [proc for proc in pids.values() if _alive(proc.pid)]
        for name in ("s3", "mlflow", "prefect"):  # each server led its own process group
            with pytest.raises(ProcessLookupError):
                os.killpg(pids[name].pid, 0)
        shutil.rmtree(base, ignore_errors=True)
