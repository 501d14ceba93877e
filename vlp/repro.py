"""`vlp --profile NAME repro`: the whole DVC pipeline at a profile's sizes, as one DVC experiment.

A profile is not a DVC param (profiles.yaml), so the command expands it, and any `--set`
after it, into `dvc exp run --temp -S key=value` flags: DVC applies them to params.yaml in a
temporary copy of the repository, runs the stages there, and keeps the result as an
experiment (`dvc exp show`, `dvc exp apply`). The workspace's params.yaml, dvc.lock, metrics,
plots and models are left as they were. The stages learn the profile's name from
`VLP_PROFILE`, so their models are registered as `vlp-<task>-<profile>`
(`vlp.registry.model_name`) and never compete with the default pipeline's champions; their
MLflow runs go to the workspace's store, under one pipeline run this command opens.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlp.config import (
    DEFAULT_PARAMS,
    Config,
    tracking_uri,
    variant_settings,
    write_variant_params,
)
from vlp.errors import ConfigError
from vlp.lineage import PROFILE_ENV
from vlp.tracking import PARENT_RUN_ENV, end_pipeline_run, start_pipeline_run


def hydra_value(value: Any) -> str:
    """`value` written in Hydra's override grammar, which `dvc exp run -S` parses.

    Strings are always quoted, so one that reads as a number, a bool or null stays a string.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # in a quoted string backslashes escape only before a quote or at the end
        escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
        return f"'{escaped}'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot pass {value!r} ({type(value).__name__}) to `dvc exp run -S`")


def set_param_flags(
    params: str | os.PathLike, profile: str | None, overrides: list[str] | None = None
) -> list[str]:
    """The `-S` flags of `dvc exp run` that apply `profile` and then `overrides` to `params`.

    Each leaf of the profile becomes one flag, `--set` ones after it (the later wins, as
    in `vlp --profile`). Output folders stay where dvc.yaml names them: the experiment has
    its own copy of the repository. `params` must be inside the working directory, the
    repository's root.
    """
    try:
        relative = Path(params).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        raise ConfigError(
            f"{params}: not in the working directory; `dvc exp run` sets params of the "
            "repository it runs in"
        ) from None
    prefix = "" if relative == DEFAULT_PARAMS else f"{relative.as_posix()}:"
    flags: list[str] = []
    for keys, value in variant_settings(params, profile, overrides):
        flags += ["-S", f"{prefix}{'.'.join(keys)}={hydra_value(value)}"]
    return flags


def variant_config(
    params: str | os.PathLike, profile: str, overrides: list[str] | None = None
) -> Config:
    """The Config the experiment's stages read: params.yaml with the profile and `--set`s
    applied, output folders unmoved, labelled with the profile. A bad key is a ConfigError."""
    with tempfile.TemporaryDirectory(prefix="vlp-repro-") as tmp:
        return write_variant_params(params, Path(tmp) / "params.yaml", profile, overrides)


def exp_run_command(
    params: str | os.PathLike,
    profile: str,
    overrides: list[str] | None,
    name: str,
    targets: list[str] | None = None,
) -> list[str]:
    """`dvc exp run --temp --name NAME -S ... [targets]`: the experiment this command runs."""
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name]
    return cmd + set_param_flags(params, profile, overrides) + list(targets or [])


def repro_profile(
    params: str | os.PathLike,
    profile: str | None,
    overrides: list[str] | None = None,
    name: str | None = None,
    targets: list[str] | None = None,
    dry_run: bool = False,
) -> int:
    """Run the pipeline (or `targets` and what they need) at `profile`'s sizes as the DVC
    experiment `name` (default `<profile>-<time>`) in a temporary directory.

    Returns `dvc exp run`'s exit status: 0 when the experiment is saved. With `dry_run`
    the command is printed, not run.
    """
    if not profile or profile == "default":
        raise ConfigError(
            "`vlp repro` runs a profile of profiles.yaml as a DVC experiment: name one "
            "with --profile (e.g. `vlp --profile smoke repro`); `dvc repro` runs the "
            "default pipeline"
        )
    cfg = variant_config(params, profile, overrides)  # a bad key fails before any work
    name = name or f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = exp_run_command(params, profile, overrides, name, targets)
    env = {PROFILE_ENV: profile, "MLFLOW_TRACKING_URI": tracking_uri(cfg)}
    if dry_run:
        shown = ["dvc", *cmd[3:]]
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(shown))
        return 0
    # the pipeline run opens here, so the MLflow experiment (created with its artifact
    # folder on first use) lives in the workspace, not in DVC's temporary copy
    parent = start_pipeline_run(cfg, driver="dvc-exp", tags={"vlp.dvc_experiment": name})
    code = 1
    try:
        code = subprocess.run(cmd, env={**os.environ, **env, PARENT_RUN_ENV: parent}).returncode
    finally:
        end_pipeline_run(cfg, parent, "FINISHED" if code == 0 else "FAILED")
    if code == 0:
        print(f"vlp repro: saved DVC experiment {name} (profile {profile}); `dvc exp show`")
    else:
        print(
            f"vlp repro: experiment {name} failed (dvc exit {code}); the workspace is unchanged",
            file=sys.stderr,
        )
    return code
