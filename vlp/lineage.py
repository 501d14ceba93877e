"""Lineage of a run: what code, params and data it came from, and which process writes it.

Git state and the hashes dvc.lock records for a stage's inputs become `vlp.dvc_lock.<path>`
tags; the content hashes a stage computed from the files it opened become
`vlp.input.<role>` tags. Every run also names the process that writes it (host, pid,
start time), so that a later stage can close the runs of a process that was killed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from vlp.config import Config
from vlp.errors import ConfigError

FLOW_RUN_ENV = "VLP_PREFECT_FLOW_RUN_ID"
# Prefect's runner exports this to processes it starts for a deployment run.
PREFECT_FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"
# The profile of a variant the flow runs: its stages read the variant's params.yaml, in
# which the profile is already applied, so only this label tells them its name.
PROFILE_ENV = "VLP_PROFILE"

TAG_INPUT = "vlp.input."  # + role: content hash of an input the run opened (+ ".path": where)
TAG_DVC_LOCK = "vlp.dvc_lock."  # + path: the hash dvc.lock records for it, not one computed here
TAG_HOST, TAG_PID, TAG_PROCESS_START = "vlp.host", "vlp.pid", "vlp.process_start"
# DVC exports the name of the stage it is running, and its project's root, to the command.
DVC_STAGE_ENV, DVC_ROOT_ENV = "DVC_STAGE", "DVC_ROOT"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def git_state() -> tuple[str, bool]:
    """(commit sha or "none", dirty?) of the working tree.

    Untracked files do not count, nor dvc.lock, which `dvc repro` itself rewrites
    between stages (the data hashes are recorded separately).
    """
    commit = _git("rev-parse", "HEAD") or "none"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock")
    return commit, bool(status)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _norm(p: str) -> str:
    return os.path.normpath(p).replace(os.sep, "/")


def _locked_outs(lock: dict[str, Any]) -> dict[str, str]:
    """Every output path recorded in dvc.lock -> its DVC hash (md5, `.dir` for folders)."""
    outs: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            digest = out.get("md5") or out.get("etag") or out.get("checksum")
            if digest:
                outs[_norm(out["path"])] = str(digest)
    return outs


def _lookup_hash(path: str, outs: dict[str, str]) -> str | None:
    """Hash of `path` itself, or of the DVC output folder that contains it."""
    path = _norm(path)
    if path in outs:
        return outs[path]
    for out, digest in outs.items():
        if path.startswith(out + "/"):
            return digest
    return None


def stage_input_hashes(dvc_stage: str, root: Path = Path(".")) -> dict[str, str]:
    """DVC hashes of a stage's data inputs: its dvc.yaml deps that other stages produce.

    Read from the *upstream* stages' entries in dvc.lock, which DVC writes before it
    starts the next stage, so they describe exactly what this run consumes. Source
    files are left out: the git commit covers them.
    """
    outs = _locked_outs(_read_yaml(root / "dvc.lock"))
    hashes = {}
    for dep in stage_deps(dvc_stage, root):
        if digest := _lookup_hash(dep, outs):
            hashes[_norm(dep)] = digest
    return hashes


def stage_deps(dvc_stage: str, root: Path = Path(".")) -> list[str]:
    """The dep paths of one dvc.yaml stage as DVC resolves them; [] if there is no such stage.

    `dvc_stage` is DVC's name for it, `foreach`/`matrix` members included
    (`finetune@vqa-scratch`), so DVC itself expands the templates.
    """
    if not (root / "dvc.yaml").exists():
        return []
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root), config={"core": {"no_scm": True}}) as repo:
            stages = repo.stage.collect(f"{Path(repo.root_dir) / 'dvc.yaml'}:{dvc_stage}")
    except DvcException:
        return []
    return [
        str(dep.def_path)
        for stage in stages
        for dep in stage.deps
        if not isinstance(dep, ParamsDependency)
    ]


def check_checkpoint_deps(paths: dict[str, str | None]) -> None:
    """Refuse, inside `dvc repro`, a checkpoint directory the running stage reads (`paths`:
    params key -> directory, None when unset) that is not one of the stage's deps.

    DVC reruns a stage when a dep's files change; a checkpoint named only in params would
    leave the stage's outputs cached against weights that have since changed. Outside DVC
    (no `DVC_STAGE` in the environment) nothing is checked.
    """
    stage = os.environ.get(DVC_STAGE_ENV)
    named = {key: path for key, path in paths.items() if path}
    if not stage or not named:
        return
    root = Path(os.environ.get(DVC_ROOT_ENV) or ".")
    deps = [(root / d).resolve() for d in stage_deps(stage, root)]
    for key, path in named.items():
        target = (root / path).resolve()
        if not any(target == d or d in target.parents for d in deps):
            raise ConfigError(
                f"{key}: {path} is read by DVC stage {stage} but is not one of its deps: add "
                f"it to the stage's deps in dvc.yaml, so that `dvc repro` reruns the stage "
                "when the checkpoint's files change"
            )


def data_hash(cfg: Config, root: Path = Path(".")) -> str:
    """DVC hash of the dataset (`data.root`) from dvc.lock or its .dvc file; "none" if unknown."""
    digest = _lookup_hash(cfg.data.root, _locked_outs(_read_yaml(root / "dvc.lock")))
    if digest:
        return digest
    dvc_file = _read_yaml(root / f"{_norm(cfg.data.root)}.dvc")
    for out in dvc_file.get("outs") or []:
        if out.get("md5"):
            return str(out["md5"])
    return "none"


def flow_run_id() -> str | None:
    """The Prefect flow-run id driving this process, if any."""
    return os.environ.get(FLOW_RUN_ENV) or os.environ.get(PREFECT_FLOW_RUN_ENV) or None


def profile_label(cfg: Config) -> str:
    """The profile a run belongs to: the one a driving flow names, else the config's own."""
    return os.environ.get(PROFILE_ENV) or cfg.profile


def lineage_tags(cfg: Config, stage: str | None = None, root: Path = Path(".")) -> dict[str, str]:
    """Tags tying a run to its code and params, and to the pipeline's dvc.lock.

    `stage` is the DVC stage whose deps' dvc.lock hashes are recorded (as
    `vlp.dvc_lock.<path>`); without one (a pipeline run), the lock's hash of `data.root`.
    These say what the lock holds, not what a run read: see `input_tags`.
    """
    commit, dirty = git_state()
    tags = {
        "vlp.git_commit": commit,
        "vlp.git_dirty": str(dirty).lower(),
        "vlp.params_hash": cfg.section_hash(),
        "vlp.profile": profile_label(cfg),
    }
    if stage:
        tags["vlp.dvc_stage"] = stage
        locked = stage_input_hashes(stage, root)
    else:
        outs = _locked_outs(_read_yaml(root / "dvc.lock"))
        digest = _lookup_hash(cfg.data.root, outs)
        locked = {_norm(cfg.data.root): digest} if digest else {}
    for path, digest in locked.items():
        tags[f"{TAG_DVC_LOCK}{path}"] = digest
    if fid := flow_run_id():
        tags["vlp.prefect_flow_run_id"] = fid
    return tags


def input_tags(inputs: dict[str, tuple[str | os.PathLike, str]]) -> dict[str, str]:
    """Tags naming what a run opened: role -> (path, content hash it computed from the files).

    `{"data": ("data/shapes", "ab12..")}` -> `vlp.input.data` = the hash and
    `vlp.input.data.path` = the path.
    """
    tags = {}
    for role, (path, digest) in inputs.items():
        tags[f"{TAG_INPUT}{role}"] = digest
        tags[f"{TAG_INPUT}{role}.path"] = str(path)
    return tags


def pipeline_key(cfg: Config, root: Path = Path(".")) -> str:
    """Identity of one pipeline run: hash of git commit + params hash + data hash."""
    commit, _ = git_state()
    blob = f"{commit}|{cfg.section_hash()}|{data_hash(cfg, root)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- writer processes


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, `<boot id>:<start tick>`) of a process of this machine; None if
    /proc cannot tell (no such process, or no /proc)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # the command name in parentheses may hold spaces: count fields after it
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], f"{boot}:{fields[19]}"


def process_tags() -> dict[str, str]:
    """Tags naming the process that writes a run: host, pid and when it started."""
    stat = _proc_stat(os.getpid())
    return {
        TAG_HOST: socket.gethostname(),
        TAG_PID: str(os.getpid()),
        TAG_PROCESS_START: stat[1] if stat else "",
    }


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process a run's `process_tags` name has surely ended.

    Only this machine's processes can be checked: a run of another host, or without the
    tags, counts as live. A pid now held by a process that started at another time, or
    by a zombie, counts as ended.
    """
    pid = tags.get(TAG_PID, "")
    if tags.get(TAG_HOST) != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(int(pid))
    if stat is None:
        return False
    state, started = stat
    recorded = tags.get(TAG_PROCESS_START)
    return state in ("Z", "X") or bool(recorded) and started != recorded


def _running(client: Any, exp_id: str, where: str) -> list[Any]:
    return client.search_runs(
        [exp_id], filter_string=f"{where} and attributes.status = 'RUNNING'", max_results=1000
    )


def close_abandoned_runs(exp_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `stage` left RUNNING by a process that has ended; return their ids.

    Their parent runs too, once no child of theirs is alive and the process that made
    the parent (a flow, or the stage that created it) has ended as well. Runs of live
    processes, of other hosts, or without process tags are left alone.
    """
    import mlflow

    client = mlflow.MlflowClient()
    closed, parents = [], set()
    for run in _running(client, exp_id, f"tags.`vlp.stage` = '{stage}'"):
        if process_gone(run.data.tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            parents.add(run.data.tags.get("mlflow.parentRunId"))
    for parent_id in parents - {None}:
        parent = client.get_run(parent_id)
        if parent.info.status != "RUNNING" or not process_gone(parent.data.tags):
            continue
        children = _running(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")
        if all(process_gone(child.data.tags) for child in children):
            client.set_terminated(parent_id, status="KILLED")
            closed.append(parent_id)
    return closed
