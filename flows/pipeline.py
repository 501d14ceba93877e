"""The vlp pipeline as a Prefect flow that drives DVC, and its cron deployment.

The flow adds orchestration (retries, logs, a schedule, a UI) on top of the one stage
implementation: each Prefect task runs `dvc repro --single-item <stage>` for one
stage of dvc.yaml, in DVC's dependency order, so after a plain flow run `dvc status` has
nothing to do. A run with a profile or overrides is a variant, run like `dvc exp run
--temp --set-param`: in a temporary git worktree (sharing the DVC cache) whose params.yaml
has them applied, then saved with `dvc exp save`, so it is listed and compared in
`dvc exp show` and the workspace's params.yaml, metrics, plots and dvc.lock are untouched.
The flow opens the MLflow pipeline run itself and hands it to every stage process through
`VLP_PARENT_RUN_ID` (and a variant's profile through `VLP_PROFILE`, which also keeps
its registered models apart: `vlp.registry.model_name`). A promotion the gate refuses is
an outcome of the run, logged and kept with it, not a failure of the flow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from vlp.cli import PROMOTE_EXIT
from vlp.config import Config, load_config, tracking_uri, write_variant_params
from vlp.errors import ConfigError, DataError, OutputError
from vlp.lineage import FLOW_RUN_ENV, PROFILE_ENV
from vlp.tracking import PARENT_RUN_ENV, end_pipeline_run, start_pipeline_run

# `vlp` marks what retrying cannot fix with this in its message: a user error (bad params,
# bad data; exit 2) or a promotion refused for a person to resolve (exit 4).
USER_ERROR_MARK = ": error: "
# How `dvc repro` reports the promotion gate's refusal (`vlp promote` exit 4): an outcome
# of the run, which goes on, not a failed stage.
REFUSED_MARK = f", exited with {PROMOTE_EXIT['refused']}"
# Optional params naming what the stages read besides their declared DVC dependencies
# (null: not used): a variant checks them when set, with every dependency (`data.root`).
OPTIONAL_INPUT_KEYS = (
    "data.shards",
    "evaluate.data_root",
    "model.init_from",
    "model.image_pretrained",
    "model.text_pretrained",
    "model.tokenizer_pretrained",
    "pretrain_vision.init_from",
)


class StageFailed(RuntimeError):
    """`dvc repro` of one stage failed; `transient` says whether a retry may help."""

    def __init__(self, stage: str, code: int, tail: str, transient: bool) -> None:
        super().__init__(f"stage {stage} failed (exit {code}):\n{tail}")
        self.transient = transient


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and not exc.transient)


@contextmanager
def variant_workspace(root: Path) -> Iterator[Path]:
    """A temporary git worktree of `root`'s HEAD plus its uncommitted changes, sharing its DVC cache.

    A variant's stages run there, so the workspace's params.yaml, metrics, plots and dvc.lock
    stay as they are. The worktree is removed on exit.
    """
    from dvc.repo import Repo

    def git(*args: str, cwd: Path = root) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OutputError(f"{root}: git {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    git("rev-parse", "--verify", "-q", "HEAD^{commit}")  # a variant starts from a commit
    with Repo(str(root)) as repo:
        cache = repo.cache.local_cache_dir
    work = Path(tempfile.mkdtemp(prefix="vlp-variant-")) / root.name
    git("worktree", "add", "--detach", "-q", str(work), "HEAD")
    try:
        # the workspace's uncommitted edits, as `dvc exp run` takes them
        changed = git("ls-files", "-z", "--modified", "--others", "--exclude-standard")
        for name in filter(None, changed.split("\0")):
            src, dst = root / name, work / name
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            elif dst.is_file():
                dst.unlink()  # deleted in the workspace
        # links where the file system allows, never symlinks: vlp refuses images that
        # lead out of their dataset
        for key, value in (("cache.dir", cache), ("cache.type", "reflink,hardlink,copy")):
            subprocess.run(
                [sys.executable, "-m", "dvc", "config", "--local", key, value],
                cwd=work,
                check=True,
                capture_output=True,
            )
        yield work
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work)], cwd=root)
        shutil.rmtree(work.parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root)


def checkout_tracked_data(work: Path) -> list[str]:
    """Check out every `dvc add`ed path of the worktree `work` from the shared DVC cache.

    A git worktree holds a dataset's `.dvc` file, not its files. Returns the `.dvc` files;
    a DataError naming them if the cache lacks their data (`dvc add` or `dvc pull` first).
    """
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with chdir(work), Repo(".") as repo:
        tracked = sorted(s.relpath for s in repo.index.stages if not isinstance(s, PipelineStage))
    if not tracked:
        return []
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "checkout", *tracked],
        cwd=work,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        why = " ".join((done.stdout + done.stderr).split())[-300:]
        raise DataError(
            f"{', '.join(tracked)}: cannot check the tracked data out of the DVC cache for a "
            f"variant ({why}); `dvc add` or `dvc pull` it first"
        )
    return tracked


def check_variant_inputs(work: Path, cfg: Config) -> None:
    """Refuse, before any stage runs, an input a variant's stages could not read.

    The inputs: every dependency of a dvc.yaml stage, and each `OPTIONAL_INPUT_KEYS` set.
    A relative one must be in the worktree `work` (git or DVC tracks it) or be written by a
    stage; an absolute one must exist. A DataError names its key (or stage) otherwise.
    """
    outs, deps = stage_paths(work)
    names = {Path(cfg.data.root): "data.root"}
    for key in OPTIONAL_INPUT_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            names[Path(value)] = key
            deps.setdefault(Path(value), key)
    for path, stage in deps.items():
        what = names.get(path, f"stage {stage}")
        if path.is_absolute():
            if not path.exists():
                raise DataError(f"{what}: {path} not found")
        elif not (work / path).exists() and not any(
            path == out or out in path.parents for out in outs
        ):
            raise DataError(
                f"{what}: {path} is not in the variant's worktree: neither git nor DVC tracks "
                f"it and no stage writes it; `dvc add {path}` (keep the .dvc file), or use "
                "an absolute path"
            )


def save_experiment(work: Path, name: str) -> None:
    """Record the variant run in `work` as DVC experiment `name` (see `dvc exp show`).

    Files the stages wrote that git does not ignore (metrics and plots DVC does not cache)
    go into the experiment too, as `dvc exp run` would commit them.
    """
    new = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cmd = [sys.executable, "-m", "dvc", "exp", "save", "--name", name]
    cmd += [arg for path in filter(None, new.split("\0")) for arg in ("--include-untracked", path)]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise OutputError(
            f"dvc exp save --name {name} failed:\n{(done.stdout + done.stderr)[-2000:]}"
        )


def pipeline_stages(repo: Path) -> list[str]:
    """Names of the dvc.yaml stages of `repo`, upstream first, else in dvc.yaml order."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    # stage addresses are relative to the working directory
    with chdir(repo), Repo(".") as dvc_repo:
        position = {s.addressing: i for i, s in enumerate(dvc_repo.index.stages)}
        # DVC's edges point from a stage to the stages it depends on: reverse them
        order = nx.lexicographical_topological_sort(
            dvc_repo.index.graph.reverse(copy=True), key=lambda s: position.get(s.addressing, -1)
        )
        return [s.addressing for s in order if isinstance(s, PipelineStage)]


def stage_paths(repo: Path) -> tuple[set[Path], dict[Path, str]]:
    """What the dvc.yaml stages of `repo` write, and each path they depend on with the
    first stage that does (params files aside); relative to `repo` unless absolute."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    outs: set[Path] = set()
    deps: dict[Path, str] = {}
    with chdir(repo), Repo(".") as dvc_repo:
        for stage in dvc_repo.index.stages:
            if not isinstance(stage, PipelineStage):
                continue
            outs.update(Path(out.def_path) for out in stage.outs)
            for dep in stage.deps:
                if not isinstance(dep, ParamsDependency):
                    deps.setdefault(Path(dep.def_path), stage.addressing)
    return outs, deps


@task(name="dvc-stage", task_run_name="{stage}", retry_condition_fn=_retry_if_transient)
def run_stage(stage: str, repo: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item`); skipped by DVC if up to date."""
    log = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log.info("stage %s: %s", stage, " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines()[-40:]:
        log.info("  %s", line)
    if proc.returncode != 0 and REFUSED_MARK in output:
        # the gate did its job: a person resolves it (`vlp promote TASK --force`, ...)
        log.warning("stage %s: promotion refused; the champion is kept", stage)
        return {"stage": stage, "ran": True, "seconds": round(seconds, 2), "outcome": "refused"}
    if proc.returncode != 0:
        transient = USER_ERROR_MARK not in output
        raise StageFailed(stage, proc.returncode, output[-2000:], transient)
    # unchanged, or restored from DVC's run cache (a variant's worktree starts empty)
    skipped = "didn't change, skipping" in output or "is cached - skipping run" in output
    log.info("stage %s %s in %.1f s", stage, "up to date" if skipped else "ran", seconds)
    return {"stage": stage, "ran": not skipped, "seconds": round(seconds, 2)}


@flow(name="vlp-pipeline", log_prints=True)
def vlp_pipeline(
    params: str = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
    repo: str = ".",
    experiment: str | None = None,
) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline of `repo` stage by stage, under one MLflow pipeline run.

    Without `profile` and `overrides` (`section.key=value`) the stages run in the workspace.
    With them they are a variant: the stages run in a temporary worktree whose params.yaml
    has them applied, and the result is saved as the DVC experiment `experiment` (default
    `<profile>-<time>`); the workspace is left as it was.
    """
    root = Path(repo).resolve()
    params_path = root / params if not Path(params).is_absolute() else Path(params)
    if not profile and not overrides:
        return _run_pipeline(root, root, load_config(params_path), None)
    load_config(params_path, profile, overrides)  # a bad key fails before any work
    name = experiment or f"{profile or 'set'}-{time.strftime('%Y%m%d-%H%M%S')}"
    with variant_workspace(root) as work:
        dest = work / params_path.relative_to(root)
        cfg = write_variant_params(params_path, dest, profile, overrides)
        checkout_tracked_data(work)
        check_variant_inputs(work, cfg)
        results = _run_pipeline(root, work, cfg, profile)
        save_experiment(work, name)
    get_run_logger().info("variant saved as DVC experiment %s (see `dvc exp show`)", name)
    return results


def _run_pipeline(root: Path, work: Path, cfg: Config, profile: str | None) -> list[dict[str, Any]]:
    """Run the stages of `work` in DVC order; the MLflow store and runs are `root`'s."""
    import os

    log = get_run_logger()
    with chdir(root):
        flow_run_id = str(flow_run.id or "")
        parent = start_pipeline_run(
            cfg, driver="prefect", tags={"vlp.prefect_flow_run_id": flow_run_id}
        )
        uri = tracking_uri(cfg)  # absolute: every stage process shares root's store
    stages = pipeline_stages(work)
    log.info("profile %s; MLflow run %s; stages: %s", cfg.profile, parent, ", ".join(stages))
    env = {
        **os.environ,
        PARENT_RUN_ENV: parent,
        FLOW_RUN_ENV: flow_run_id,
        "MLFLOW_TRACKING_URI": uri,
    }
    env.pop(PROFILE_ENV, None)
    if profile:
        env[PROFILE_ENV] = profile
    retrying = run_stage.with_options(
        retries=cfg.schedule.retries, retry_delay_seconds=cfg.schedule.retry_delay_s
    )
    results: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for stage in stages:
            results.append(retrying(stage, str(work), env))
        status = "FINISHED"
    finally:
        with chdir(root):
            end_pipeline_run(cfg, parent, status)
    return results


def deployment(cfg: Config, parameters: dict[str, Any] | None = None) -> Any:
    """The scheduled deployment: `vlp_pipeline` on `schedule.cron` in `schedule.timezone`."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    if not cfg.schedule.cron.strip():
        raise ConfigError("schedule.cron is empty")
    return vlp_pipeline.to_deployment(
        name=cfg.schedule.deployment,
        schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
        parameters=parameters or {"repo": str(Path.cwd())},
        # importable by module name from any working directory
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["vlp"],
    )


def serve(cfg: Config) -> None:
    """Serve the scheduled deployment until interrupted (needs a Prefect server)."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(cfg))
