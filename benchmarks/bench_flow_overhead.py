"""Prefect flow overhead against plain `dvc repro`: same stages, same data, one run each.

    python benchmarks/bench_flow_overhead.py [--profile smoke] [--keep] [--work-pool]

Copies the working tree (tracked and unignored files) into two fresh git + DVC repos,
runs the whole pipeline once with `dvc repro` in one and once with the Prefect flow in
the other (against a local temporary Prefect server, started beforehand and timed
separately), and prints wall times and their ratio; then repeats both with nothing to do,
which isolates the orchestration cost. Each repo gets its own MLflow store.

With `--work-pool` the flow runs as a team runs it: a deployment on the work pool of the
local team stack (`make services`, started if needed), executed by a `prefect worker`
process, and both pipelines track to the stack's MLflow server. The report then splits the
flow run's time into waiting for the worker, starting the flow process, the stages
(`dvc repro --single-item`, from the task runs' own times) and the rest of the flow.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def copy_repo(dest: Path, profile: str) -> Path:
    """A git + DVC repo at `dest` with the working tree's files and `profile` selected."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        # pipeline outputs are rebuilt, never copied (some are kept in git, e.g. reports)
        outs = [Path(o.fs_path).relative_to(ROOT).as_posix() for o in repo.index.outs]
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if any(name == o or name.startswith(o + "/") for o in outs):
            continue
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    from vlp.config import write_variant_params

    write_variant_params(dest / "params.yaml", dest / "params.yaml", profile)
    git = ["git", "-c", "user.email=bench@vlp", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=dest, check=True)
    return dest


def env() -> dict[str, str]:
    """The environment of a stage: the venv's `vlp`/`dvc` first on PATH, local stores."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VLP_"))}
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    return out


WORKER_QUERY_S = 5  # how often the worker asks the server for runs (Prefect's default: 10)


async def _flow_run_breakdown(api: str, flow_run_id: object) -> dict[str, float]:
    """Seconds of one finished flow run: queued, starting, stages, rest of the flow."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api=api) as client:
        states = await client.read_flow_run_states(flow_run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    at = {}
    for state in sorted(states, key=lambda s: s.timestamp):
        at.setdefault(state.type.value, state.timestamp)
    first = min(at.values())
    stages = sum(t.total_run_time.total_seconds() for t in tasks)
    running = (at["COMPLETED"] - at["RUNNING"]).total_seconds()
    return {
        "waiting for the worker": (at["PENDING"] - first).total_seconds(),
        "worker starts the flow process": (at["RUNNING"] - at["PENDING"]).total_seconds(),
        "stages (task runs)": stages,
        "flow outside the stages": running - stages,
        "total": (at["COMPLETED"] - first).total_seconds(),
    }


def run_through_work_pool(
    flow_repo: Path, stack_env: dict[str, str], pool: str
) -> list[dict[str, float]]:
    """Deploy the flow of `flow_repo` on `pool`, run it twice through a worker (work, then
    nothing to do); return both runs' wall times and breakdowns."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import vlp_pipeline

    # prefect has read its settings already (`up` made the work pool)
    with temporary_settings({PREFECT_API_URL: stack_env["PREFECT_API_URL"]}):
        return _deploy_and_run(vlp_pipeline, run_deployment, flow_repo, stack_env, pool)


def _deploy_and_run(
    vlp_pipeline: Any, run_deployment: Any, flow_repo: Path, stack_env: dict[str, str], pool: str
) -> list[dict[str, float]]:
    vlp_pipeline.from_source(str(flow_repo), "flows/pipeline.py:vlp_pipeline").deploy(
        name="bench-flow-overhead",
        work_pool_name=pool,
        parameters={"repo": str(flow_repo)},
        print_next_steps=False,
    )
    worker_env = {**env(), **stack_env, "PYTHONPATH": str(flow_repo)}
    worker_env["PREFECT_WORKER_QUERY_SECONDS"] = str(WORKER_QUERY_S)
    worker = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        cwd=flow_repo,
        env=worker_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs = []
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            run = run_deployment("vlp-pipeline/bench-flow-overhead", timeout=None)
            wall = time.perf_counter() - t0
            if not run.state.is_completed():
                raise SystemExit(f"flow run {run.id} ended {run.state.type.value}")
            parts = asyncio.run(_flow_run_breakdown(stack_env["PREFECT_API_URL"], run.id))
            runs.append({"wall": wall, **parts})
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        worker.wait()
    return runs


def timed_dvc_repro(repo: Path, environ: dict[str, str]) -> float:
    """Seconds `dvc repro` takes in `repo`; exits with its output's tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=environ, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t0


def main_work_pool(args: argparse.Namespace, tmp: Path) -> None:
    from vlp.services import client_env, load_settings, up, work_pool

    t0 = time.perf_counter()
    up(ROOT)
    up_s = time.perf_counter() - t0
    settings = load_settings(ROOT)
    stack_env = client_env(settings)
    dvc_repo = copy_repo(tmp / "dvc", args.profile)
    flow_repo = copy_repo(tmp / "flow", args.profile)
    dvc_s = timed_dvc_repro(dvc_repo, {**env(), **stack_env})
    work, noop = run_through_work_pool(flow_repo, stack_env, work_pool(ROOT))
    print(f"profile               {args.profile}")
    print(f"stack up              {up_s:8.1f} s  (make services; 0 when already running)")
    print(f"dvc repro             {dvc_s:8.1f} s  (tracking to {stack_env['MLFLOW_TRACKING_URI']})")
    print(
        f"work-pool flow run    {work['wall']:8.1f} s  trigger to completed, as the caller sees it"
    )
    for key in ("waiting for the worker", "worker starts the flow process"):
        print(f"  {key:34} {work[key]:7.1f} s")
    print(f"  {'stages (task runs)':34} {work['stages (task runs)']:7.1f} s")
    print(f"  {'flow outside the stages':34} {work['flow outside the stages']:7.1f} s")
    print(
        f"ratio flow/dvc        {work['wall'] / dvc_s:8.3f}  (worker polls every {WORKER_QUERY_S} s)"
    )
    print(
        f"no-op work-pool run   {noop['wall']:8.1f} s  (stages {noop['stages (task runs)']:.1f} s)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--keep", action="store_true", help="keep the temporary repos")
    p.add_argument(
        "--work-pool", action="store_true", help="run the flow through the team stack's work pool"
    )
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-flow-"))
    if args.work_pool:
        try:
            main_work_pool(args, tmp)
        finally:
            if args.keep:
                print(f"repos kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return 0
    try:
        dvc_repo = copy_repo(tmp / "dvc", args.profile)
        flow_repo = copy_repo(tmp / "flow", args.profile)

        dvc_s = timed_dvc_repro(dvc_repo, env())

        os.environ.clear()
        os.environ.update(env())
        from prefect.testing.utilities import prefect_test_harness

        t0 = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=180):
            server_s = time.perf_counter() - t0
            from flows.pipeline import vlp_pipeline

            t0 = time.perf_counter()
            results = vlp_pipeline(repo=str(flow_repo))
            flow_s = time.perf_counter() - t0
            # nothing to do: what remains is pure orchestration cost
            t0 = time.perf_counter()
            vlp_pipeline(repo=str(flow_repo))
            flow_noop_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([str(VENV_BIN / "dvc"), "repro"], cwd=dvc_repo, env=env(), check=True,
                       capture_output=True)  # fmt: skip
        dvc_noop_s = time.perf_counter() - t0
        ran = sum(r["ran"] for r in results)
        clean = subprocess.run(
            [str(VENV_BIN / "dvc"), "status"], cwd=flow_repo, env=env(), capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"profile               {args.profile}")
        print(f"stages run            {ran} of {len(results)} (flow); dvc status after: {clean!r}")
        print(f"dvc repro             {dvc_s:8.1f} s")
        print(f"prefect flow          {flow_s:8.1f} s  (server already running)")
        print(f"prefect server start  {server_s:8.1f} s  (once per server, not per run)")
        print(
            f"flow overhead         {flow_s - dvc_s:8.1f} s  ratio flow/dvc = {flow_s / dvc_s:.3f}"
        )
        print(f"no-op dvc repro       {dvc_noop_s:8.1f} s")
        print(f"no-op prefect flow    {flow_noop_s:8.1f} s  (= orchestration cost of one run)")
    finally:
        if args.keep:
            print(f"repos kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
