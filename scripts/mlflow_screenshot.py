"""Screenshot the MLflow UI comparing the two latest pipeline runs (headless Chromium).

    python scripts/mlflow_screenshot.py [--backend-store-uri sqlite:///mlflow.db]
        [--out docs/mlflow_compare.png] [--view compare|runs]

Starts `mlflow ui` on a free loopback port, opens the run-comparison page of the two most
recent `pipeline-...` parent runs (or the runs table) and saves a PNG; both processes are
always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def pipeline_runs(uri: str, experiment: str, n: int = 2) -> tuple[str, list[str]]:
    """(experiment id, ids of the `n` latest pipeline parent runs)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}; run the pipeline first")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`vlp.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=n,
    )
    if len(runs) < n:
        raise SystemExit(f"need {n} pipeline runs in {uri}, found {len(runs)}")
    return exp.experiment_id, [r.info.run_id for r in runs]


def page_url(base: str, exp_id: str, run_ids: list[str], view: str) -> str:
    """The MLflow UI address of the comparison page (or the experiment's runs table)."""
    if view == "runs":
        return f"{base}/#/experiments/{exp_id}/runs"
    query = urllib.parse.urlencode(
        {"runs": json.dumps(run_ids), "experiments": json.dumps([exp_id])}
    )
    return f"{base}/#/compare-runs?{query}"


def chromium() -> str:
    """Path of a Chromium binary (Debian `chromium`, or $CHROMIUM)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    raise SystemExit("no chromium found: apt-get install -y chromium (or set CHROMIUM)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="vlp")
    p.add_argument("--out", default="docs/mlflow_compare.png")
    p.add_argument("--view", choices=("compare", "runs"), default="compare")
    p.add_argument("--size", default="1600,1400", help="window width,height in pixels")
    p.add_argument("--wait-ms", type=int, default=20000, help="page render budget")
    args = p.parse_args(argv)

    exp_id, run_ids = pipeline_runs(args.backend_store_uri, args.experiment)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    ui = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", args.backend_store_uri]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _wait_http(f"{base}/health", ui, timeout=180)
        url = page_url(base, exp_id, run_ids, args.view)
        with tempfile.TemporaryDirectory(prefix="vlp-chromium-") as profile:
            subprocess.run(
                [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
                + [f"--window-size={args.size}", f"--virtual-time-budget={args.wait_ms}"]
                + [f"--screenshot={out}", url],
                check=True,
                timeout=300,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
    print(f"{out}  ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
