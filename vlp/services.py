"""A team's stack on this machine: PostgreSQL, an S3 store, an MLflow server, a Prefect server.

    python -m vlp.services up | down | env | status     (`make services`, `make services-down`)

Every service listens on 127.0.0.1, with the ports and credentials of one env file (`.env`,
made from `.env.example` with fresh random passwords when missing; mode 0600). State lives
in `SERVICES_DIR` (`.services/`): the PostgreSQL cluster, logs, `pids.json` (what `down`
stops: each PID with its start time and command line, so a PID reused by another process
is left alone) and `env.sh` (the variables that point the pipeline at the stack). The S3
store is moto's server: in memory, so its objects last until `down`; it checks no
credentials; a team uses MinIO or S3 instead (deploy/compose.yaml). MLflow proxies
artifacts to the bucket, so clients need no S3 credentials. Neither MLflow nor Prefect asks
for a login here: anyone who can reach 127.0.0.1 on this machine can use them.

This module holds the services (install, start, readiness, stop) and the command line; the
env file and `Settings` are in `vlp.stack_settings`, what a PID or a port belongs to in
`vlp.stack_processes`, the PostgreSQL cluster in `vlp.stack_postgres`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from vlp.errors import ServiceError, VlpError
from vlp.io import atomic_write_json, atomic_write_text
from vlp.stack_postgres import (
    START_TIMEOUT_S,
    create_databases,
    start_postgres,
    stop_postgres,
)
from vlp.stack_processes import (
    Proc,
    describe_users,
    identify,
    listener_of,
    port_users,
    reap,
    running,
    spawn,
    stop_group,
)
from vlp.stack_settings import (
    HOST,
    PORT_KEYS,
    Settings,
    client_env,
    load_settings,
    secret_warnings,
    work_pool,
    write_private,
)

DVC_REMOTE = "team"  # the S3 remote of .dvc/config


# ---------------------------------------------------------------- server processes


def _spawn(s: Settings, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
    return spawn(cmd, s.root, env, s.logs / f"{name}.log")


def _server_env(s: Settings) -> dict[str, str]:
    """The environment of the servers: ours, less anything pointing at another stack."""
    drop = ("MLFLOW_", "PREFECT_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _venv_script(name: str) -> str:
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else name


def start_s3(s: Settings) -> Proc:
    return _spawn(
        s,
        "s3",
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(s.s3_port)],
        _server_env(s),
    )


def s3_env(s: Settings) -> dict[str, str]:
    """Credentials and endpoint of the S3 store, as boto3 and MLflow read them."""
    return {
        "AWS_ACCESS_KEY_ID": s.s3_key,
        "AWS_SECRET_ACCESS_KEY": s.s3_secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
    }


def mlflow_command(s: Settings) -> tuple[list[str], dict[str, str]]:
    """The MLflow server's argv and environment. The database password travels in the
    environment (readable by this user and root only), never in argv (`ps` shows argv to
    every user)."""
    cmd = [_venv_script("mlflow"), "server", "--host", HOST, "--port", str(s.mlflow_port)]
    cmd += ["--artifacts-destination", f"s3://{s.mlflow_bucket}", "--workers", "2"]
    env = {
        **_server_env(s),
        **s3_env(s),
        "MLFLOW_BACKEND_STORE_URI": s.pg_url(s.mlflow_db, "postgresql+psycopg2"),
        # the server's job runner (GenAI jobs, 7 processes) serves nothing vlp uses
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return cmd, env


def start_mlflow(s: Settings) -> Proc:
    cmd, env = mlflow_command(s)
    return _spawn(s, "mlflow", cmd, env)


def prefect_command(s: Settings) -> tuple[list[str], dict[str, str]]:
    """The Prefect server's argv and environment (the database URL in the latter)."""
    env = {
        **_server_env(s),
        "PREFECT_HOME": str(s.state / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": s.pg_url(s.prefect_db, "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # browsers may call the API from the server's own UI only, not from any web page
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(_loopback_origins(s.prefect_port)),
    }
    cmd = [_venv_script("prefect"), "server", "start", "--host", HOST]
    return [*cmd, "--port", str(s.prefect_port)], env


def start_prefect(s: Settings) -> Proc:
    cmd, env = prefect_command(s)
    return _spawn(s, "prefect", cmd, env)


def _loopback_origins(port: int) -> list[str]:
    return [f"http://{HOST}:{port}", f"http://localhost:{port}"]


def _alive(pid: int) -> bool:
    reap(pid)
    return identify(pid) is not None


def check_port_free(name: str, port: int) -> None:
    """ServiceError naming the service, port and holder if something listens on `port`."""
    users = port_users(port)
    if users is not None:
        raise ServiceError(
            f"{name}: port {port} is already in use by {describe_users(users)}; stop it or "
            f"set {PORT_KEYS.get(name, 'another port')} in .env"
        )


def wait_ready(name: str, url: str, pid: int, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until process `pid` (or its group) listens on the port of `url` and `url` answers
    200. ServiceError if the process dies, another process holds the port, or time runs out."""
    port = urlsplit(url).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise ServiceError(f"{name} exited while starting (log: {log}):\n{tail}")
        ours = listener_of(port, pid)
        if ours is False:
            raise ServiceError(
                f"{name}: port {port} is held by {describe_users(port_users(port) or set())}, "
                f"not by {name} (PID {pid}); stop it or set {PORT_KEYS[name]} in .env"
            )
        if ours:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.25)
    raise ServiceError(f"{name}: no answer from {url} within {timeout:.0f} s (log: {log})")


def create_buckets(s: Settings) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s.s3_url,
        aws_access_key_id=s.s3_key,
        aws_secret_access_key=s.s3_secret,
        region_name="us-east-1",
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in (s.mlflow_bucket, s.dvc_bucket):
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def create_work_pool(s: Settings, name: str) -> None:
    """The `process` work pool of prefect.yaml, if missing."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async def create() -> None:
        async with PrefectClient(api=f"{s.prefect_url}/api") as client:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process"))

    asyncio.run(create())


def configure_dvc_remote(s: Settings, repo: Path) -> None:
    """The `team` remote's endpoint and credentials in `repo/.dvc/config.local` (not in git)."""
    from configobj import ConfigObj

    path = repo / ".dvc" / "config.local"
    conf = ConfigObj(str(path))
    conf[f'remote "{DVC_REMOTE}"'] = {
        "url": f"s3://{s.dvc_bucket}/vlp",
        "endpointurl": s.s3_url,
        "access_key_id": s.s3_key,
        "secret_access_key": s.s3_secret,
    }
    conf.filename = None  # write() then returns the lines instead of writing in place
    write_private(path, "\n".join(conf.write()) + "\n")


# ---------------------------------------------------------------- up / down

SERVICES = ("postgres", "s3", "mlflow", "prefect")


def read_pids(s: Settings) -> dict[str, Proc]:
    """The processes recorded by `up` (a bare PID, of an older `up`, matches no process)."""
    if not s.pids_file.exists():
        return {}
    return {k: Proc.from_json(v) for k, v in json.loads(s.pids_file.read_text()).items()}


def _write_pids(s: Settings, pids: dict[str, Proc]) -> None:
    atomic_write_json(s.pids_file, {name: proc.to_json() for name, proc in pids.items()})


def urls(s: Settings) -> dict[str, str]:
    return {
        "postgres": f"postgresql://{HOST}:{s.pg_port}",
        "s3": s.s3_url,
        "mlflow": s.mlflow_url,
        "prefect": s.prefect_url,
    }


def _start_missing(s: Settings, pids: dict[str, Proc]) -> None:
    """Start each service not in `pids`, recording it at once (so `down` can stop it)."""
    for name in SERVICES:  # refuse before starting anything
        if name not in pids:
            check_port_free(name, s.port(name))
    if "postgres" not in pids:
        pids["postgres"] = start_postgres(s)
        _write_pids(s, pids)
    elif not listener_of(s.pg_port, pids["postgres"].pid):
        raise ServiceError(
            f"postgres: {pids['postgres'].describe()} is not listening on port {s.pg_port}"
        )
    create_databases(s)
    starters = {"s3": start_s3, "mlflow": start_mlflow, "prefect": start_prefect}
    for name, start in starters.items():
        if name not in pids:
            pids[name] = start(s)
            _write_pids(s, pids)


def up(root: Path) -> dict[str, Proc]:
    """Start every service not already running; wait until all are ready; return them."""
    s = load_settings(root)
    s.state.mkdir(parents=True, exist_ok=True)
    pids = {k: v for k, v in read_pids(s).items() if running(v)}
    try:
        _start_missing(s, pids)
        wait_ready("s3", f"{s.s3_url}/moto-api/", pids["s3"].pid, s.logs / "s3.log")
        create_buckets(s)
        wait_ready("mlflow", f"{s.mlflow_url}/health", pids["mlflow"].pid, s.logs / "mlflow.log")
        health = f"{s.prefect_url}/api/health"
        wait_ready("prefect", health, pids["prefect"].pid, s.logs / "prefect.log")
        create_work_pool(s, work_pool(root))
    except BaseException:
        down(root)
        raise
    configure_dvc_remote(s, root)
    exports = "".join(f"export {k}={v}\n" for k, v in client_env(s).items())
    atomic_write_text(s.state / "env.sh", exports)
    return pids


def down(root: Path) -> tuple[dict[str, Proc], dict[str, Proc]]:
    """Stop every recorded service (servers first); return those stopped, and the stale
    records: PIDs now used by other processes, which are left alone."""
    s = load_settings(root)
    pids = read_pids(s)
    stale = {name: proc for name, proc in pids.items() if not _ours_or_gone(proc)}
    for name in ("prefect", "mlflow", "s3"):
        if name in pids and name not in stale:
            stop_group(pids[name])
    if "postgres" in pids and "postgres" not in stale:
        stop_postgres(s, pids["postgres"])
    left = [f"{name} ({proc.describe()})" for name, proc in pids.items() if running(proc)]
    if left:
        raise ServiceError(f"still running after stop: {', '.join(left)}")
    s.pids_file.unlink(missing_ok=True)
    return {k: v for k, v in pids.items() if k not in stale}, stale


def _ours_or_gone(proc: Proc) -> bool:
    """False when the recorded PID now names another process."""
    reap(proc.pid)
    now = identify(proc.pid)
    return now is None or now == proc


def _show(procs: dict[str, Proc]) -> str:
    return ", ".join(f"{name} (PID {proc.pid})" for name, proc in procs.items()) or "none"


def _status(s: Settings) -> None:
    pids = read_pids(s)
    for name, url in urls(s).items():
        proc = pids.get(name)
        state = "running" if proc and running(proc) else "stopped"
        print(f"{name:9} {url}  {state}" + (f" (PID {proc.pid})" if proc else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlp.services", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("up", "down", "env", "status"))
    p.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (default: .)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    try:
        s = load_settings(root)
        for warning in secret_warnings(root):
            print(f"vlp services: warning: {warning}", file=sys.stderr)
        if args.action == "up":
            start = time.perf_counter()
            pids = up(root)
            for name, url in urls(s).items():
                print(f"{name:9} {url}  (PID {pids[name].pid})")
            print(f"ready in {time.perf_counter() - start:.1f} s; point the pipeline at it with:")
            print(f"  . {s.state / 'env.sh'}")
        elif args.action == "down":
            stopped, stale = down(root)
            print(f"stopped: {_show(stopped)}")
            if stale:
                print(f"left alone (their PIDs now belong to other processes): {_show(stale)}")
        elif args.action == "env":
            for k, v in client_env(s).items():
                print(f"export {k}={v}")
        else:
            _status(s)
    except VlpError as e:
        print(f"vlp services: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
