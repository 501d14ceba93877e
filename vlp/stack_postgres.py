"""The stack's PostgreSQL cluster: installed, initialised, started and stopped as its own user.

MLflow's and Prefect's databases live in one cluster under `SERVICES_DIR`; when vlp runs
as root the cluster runs as the system user `DB_USER`, as PostgreSQL requires.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from vlp.errors import ServiceError
from vlp.stack_processes import Proc, identify, stop_group
from vlp.stack_settings import HOST, Settings, write_private

DB_USER = "postgres"  # the system user PostgreSQL runs as when started by root
START_TIMEOUT_S = 180.0


def postgres_bin() -> Path:
    """The folder of `initdb`/`pg_ctl`, installing Debian's `postgresql` package if missing."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
            done = subprocess.run([*sudo, *cmd], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise ServiceError(
                    f"PostgreSQL is not installed and `{' '.join(cmd)}` failed: "
                    f"{done.stderr.strip()[-500:]}"
                )
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            raise ServiceError("PostgreSQL: no /usr/lib/postgresql/*/bin/pg_ctl after install")
    return found[-1].parent


def _as_db_user(cmd: list[str]) -> list[str]:
    """`cmd` as the `postgres` user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    if subprocess.run(["id", "-u", DB_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", DB_USER], check=True)
    return ["runuser", "-u", DB_USER, "--", *cmd]


def _give_to_db_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, DB_USER, DB_USER)


def init_postgres(s: Settings, bin_dir: Path) -> Path:
    """The cluster's data folder, created on first use (owner `POSTGRES_USER`, password auth)."""
    home = s.state / "postgres"
    data = home / "data"
    if (data / "PG_VERSION").exists():
        return data
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    _give_to_db_user(home)
    if subprocess.run(_as_db_user(["test", "-w", str(home)])).returncode != 0:
        raise ServiceError(
            f"PostgreSQL: user {DB_USER} cannot reach {home}; set SERVICES_DIR in .env to a "
            "folder whose parents it can enter"
        )
    pwfile = home / "pwfile"
    write_private(pwfile, s.pg_password + "\n")
    _give_to_db_user(pwfile)
    try:
        cmd = [str(bin_dir / "initdb"), "-D", str(data), "-U", s.pg_user, f"--pwfile={pwfile}"]
        cmd += ["--auth=scram-sha-256", "--encoding=UTF8", "--no-sync", "--no-instructions"]
        done = subprocess.run(_as_db_user(cmd), capture_output=True, text=True)
    finally:
        pwfile.unlink()
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise ServiceError(f"PostgreSQL: initdb failed: {done.stderr.strip()[-1000:]}")
    with open(data / "postgresql.conf", "a") as conf:
        # TCP on loopback only; no Unix socket in a system folder
        conf.write(f"\nlisten_addresses = '{HOST}'\nunix_socket_directories = ''\n")
    return data


def start_postgres(s: Settings) -> Proc:
    """Start the cluster (waits until it accepts connections); return the postmaster."""
    bin_dir = postgres_bin()
    data = init_postgres(s, bin_dir)
    log = data.parent / "postgres.log"
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", f"-p {s.pg_port}"]
    done = subprocess.run(
        _as_db_user([*cmd, "-w", "-t", str(int(START_TIMEOUT_S)), "start"]),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise ServiceError(f"PostgreSQL did not start: {done.stderr.strip()} (log: {log})")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    proc = identify(pid)
    if proc is None:
        raise ServiceError(f"PostgreSQL exited right after starting (log: {log})")
    return proc


def create_databases(s: Settings) -> None:
    """The MLflow and Prefect databases, if missing."""
    import psycopg2

    conn = psycopg2.connect(s.pg_url("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in (s.mlflow_db, s.prefect_db):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
    finally:
        conn.close()


def stop_postgres(s: Settings, postmaster: Proc) -> None:
    """`pg_ctl stop -m fast`; the postmaster is signalled directly if that fails."""
    data = s.state / "postgres" / "data"
    bin_dir = postgres_bin()
    subprocess.run(
        _as_db_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
        capture_output=True,
    )
    stop_group(postmaster, own_group=False)
