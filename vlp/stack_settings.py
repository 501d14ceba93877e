"""The team stack's env file (`.env`): its keys and secrets, and the `Settings` read from it.

`vlp.services` starts and stops the stack with these settings; `client_env` is what points
the pipeline's MLflow and Prefect clients at it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from vlp.errors import ServiceError

ENV_KEYS = (
    "SERVICES_DIR",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "MLFLOW_DB",
    "PREFECT_DB",
    "S3_PORT",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "MLFLOW_BUCKET",
    "DVC_BUCKET",
    "MLFLOW_PORT",
    "PREFECT_PORT",
)
SECRET_KEYS = ("POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY")
PLACEHOLDER = "change-me-local-only"  # the secrets' value in .env.example
PORT_KEYS = {
    "postgres": "POSTGRES_PORT",
    "s3": "S3_PORT",
    "mlflow": "MLFLOW_PORT",
    "prefect": "PREFECT_PORT",
}
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    """The stack's ports, credentials and state folder, from the env file."""

    root: Path  # the repository: prefect.yaml, .dvc/
    state: Path  # SERVICES_DIR, absolute
    pg_port: int
    pg_user: str
    pg_password: str
    mlflow_db: str
    prefect_db: str
    s3_port: int
    s3_key: str
    s3_secret: str
    mlflow_bucket: str
    dvc_bucket: str
    mlflow_port: int
    prefect_port: int

    def port(self, service: str) -> int:
        return {
            "postgres": self.pg_port,
            "s3": self.s3_port,
            "mlflow": self.mlflow_port,
            "prefect": self.prefect_port,
        }[service]

    def pg_url(self, db: str, driver: str = "postgresql") -> str:
        auth = f"{quote(self.pg_user, safe='')}:{quote(self.pg_password, safe='')}"
        return f"{driver}://{auth}@{HOST}:{self.pg_port}/{db}"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def pids_file(self) -> Path:
        return self.state / "pids.json"

    @property
    def logs(self) -> Path:
        return self.state / "logs"


def write_private(path: Path, text: str) -> None:
    """Write a file holding passwords or keys atomically, mode 0600 from its creation on.

    `mkstemp` creates the temp file readable by its owner only, whatever the umask, so no
    other user can open it at any moment (an fd opened while it was wider would outlive a
    later chmod); the rename keeps the mode.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of `path`; blank lines and `#` comments skipped, quotes stripped."""
    values: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ServiceError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def create_env_file(root: Path) -> Path:
    """`root/.env`: `.env.example` with a fresh random value for each secret, mode 0600."""
    lines = []
    for line in (root / ".env.example").read_text().splitlines(keepends=True):
        key = line.split("=", 1)[0].strip()
        if key in SECRET_KEYS:
            line = f"{key}={secrets.token_urlsafe(24)}\n"
        lines.append(line)
    write_private(root / ".env", "".join(lines))
    return root / ".env"


def secret_warnings(root: Path) -> list[str]:
    """What is unsafe about the secrets of `root/.env`: placeholder values, loose mode."""
    env_file = root / ".env"
    values = read_env_file(env_file)
    out = [
        f"{env_file}: {key} is the placeholder of .env.example; set a random value"
        for key in SECRET_KEYS
        if values.get(key) == PLACEHOLDER
    ]
    mode = env_file.stat().st_mode & 0o777
    if mode & 0o077:
        out.append(f"{env_file} is readable by other users (mode {mode:o}): chmod 600 it")
    return out


def load_settings(root: Path) -> Settings:
    """The settings of `root/.env`, made from `.env.example` if missing (`create_env_file`)."""
    env_file = root / ".env"
    if not env_file.exists():
        create_env_file(root)
    values = read_env_file(env_file)
    missing = [k for k in ENV_KEYS if not values.get(k)]
    if missing:
        raise ServiceError(f"{env_file}: missing {', '.join(missing)} (see .env.example)")

    def port(key: str) -> int:
        if not values[key].isdigit() or not 0 < int(values[key]) < 65536:
            raise ServiceError(f"{env_file}: {key}={values[key]!r} is not a port number")
        return int(values[key])

    return Settings(
        root=root,
        state=(root / values["SERVICES_DIR"]).resolve(),
        pg_port=port("POSTGRES_PORT"),
        pg_user=values["POSTGRES_USER"],
        pg_password=values["POSTGRES_PASSWORD"],
        mlflow_db=values["MLFLOW_DB"],
        prefect_db=values["PREFECT_DB"],
        s3_port=port("S3_PORT"),
        s3_key=values["S3_ACCESS_KEY_ID"],
        s3_secret=values["S3_SECRET_ACCESS_KEY"],
        mlflow_bucket=values["MLFLOW_BUCKET"],
        dvc_bucket=values["DVC_BUCKET"],
        mlflow_port=port("MLFLOW_PORT"),
        prefect_port=port("PREFECT_PORT"),
    )


def work_pool(root: Path) -> str:
    """The work pool of prefect.yaml's deployment (the stack creates it)."""
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    return spec["deployments"][0]["work_pool"]["name"]


def client_env(s: Settings) -> dict[str, str]:
    """What points the pipeline, the Prefect CLI and workers at the stack."""
    return {"MLFLOW_TRACKING_URI": s.mlflow_url, "PREFECT_API_URL": f"{s.prefect_url}/api"}
