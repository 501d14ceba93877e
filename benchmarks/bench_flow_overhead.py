"""Prefect flow overhead against plain `dvc repro`: same stages, same data, one run each.

    python benchmarks/bench_flow_overhead.py [--profile smoke] [--keep]

Copies the working tree (tracked and unignored files) into two fresh git + DVC repos,
runs the whole pipeline once with `dvc repro` in one and once with the Prefect flow in
the other (against a local temporary Prefect server, started beforehand and timed
separately), and prints wall times and their ratio; then repeats both with nothing to do,
which isolates the orchestration cost. Each repo gets its own MLflow store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--keep", action="store_true", help="keep the temporary repos")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-flow-"))
    try:
        dvc_repo = copy_repo(tmp / "dvc", args.profile)
        flow_repo = copy_repo(tmp / "flow", args.profile)

        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(VENV_BIN / "dvc"), "repro"],
            cwd=dvc_repo,
            env=env(),
            capture_output=True,
            text=True,
        )
        dvc_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"dvc repro failed:\n{(proc.stdout + proc.stderr)[-3000:]}")

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
