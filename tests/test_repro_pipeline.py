"""`vlp --profile smoke repro`: the project's whole dvc.yaml, generate to promote, as one DVC
experiment in a temporary git + DVC repo, leaving the workspace and production registry alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import mlflow
import pytest

from tests.data.test_user_dataset import REPO, _dvc, _git
from tests.mlflow_helpers import (
    STANDIN,
    STANDIN_LOADER,
    empty_store,  # noqa: F401
    evaluated_metrics,
    make_standin_model,
)
from vlp.config import load_config
from vlp.registry import register_model
from vlp.tasks import TASK_NAMES, TASKS

pytestmark = pytest.mark.slow  # every stage of the pipeline through `dvc exp run`


def _workspace_state(repo: Path) -> tuple[str, str, list[str]]:
    """`git status`, `dvc status` and the files outside .git/.dvc of `repo`."""
    git = subprocess.run(
        ["git", "status", "--porcelain"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = sorted(
        str(p.relative_to(repo))
        for p in repo.rglob("*")
        if p.is_file()
        and p.relative_to(repo).parts[0] not in {".git", ".dvc", "mlartifacts"}
        and "__pycache__" not in p.parts
    )
    return git, _dvc(repo, "status", "--json"), files


def _show(repo: Path, rev: str, path: str) -> str:
    """The file `path` of commit `rev` of `repo`."""
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


def _make_repo(repo: Path, store: Path) -> None:
    """The project's pipeline at its default params, committed, with a production champion."""
    repo.mkdir()
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    for name in (".gitignore", "dvc.yaml", "params.yaml", "profiles.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "vlp", repo / "vlp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(store, repo / "mlflow.db")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the pipeline")
    with chdir(repo):
        cfg = load_config("params.yaml")
        model = make_standin_model(repo.parent / "champion", "champion")
        metrics = evaluated_metrics(model, {TASKS["retrieval"].primary_metric: 0.5})
        done = register_model(
            cfg, "retrieval", model, metrics, loader=STANDIN_LOADER, extra_code_paths=[STANDIN]
        )
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    client.set_registered_model_alias(done["model"], "champion", done["version"])


def test_vlp_repro_runs_the_smoke_pipeline_as_an_experiment_apart_from_production(
    tmp_path: Path,
    empty_store: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in list(os.environ):
        if var.startswith(("MLFLOW_", "VLP_", "DVC_")):
            monkeypatch.delenv(var)
    repo = tmp_path / "repo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    _make_repo(repo, empty_store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = _workspace_state(repo)

    env = {**os.environ, "PYTHONPATH": str(repo)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        [sys.executable, "-m", "vlp.cli", "--profile", "smoke", "repro", "--name", "tiny"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ran = [line.split("'")[1] for line in done.stdout.splitlines() if "Running stage" in line]
    assert ran[0] == "generate" and ran[-1] == "promote" and "evaluate@vqa" in ran

    assert _workspace_state(repo) == before  # params, dvc.lock, metrics, models: untouched
    shown = json.loads(_dvc(repo, "exp", "show", "--json"))
    (exp,) = [e for b in shown for x in b.get("experiments") or [] for e in x["revs"]]
    assert exp["name"] == "tiny"
    assert exp["data"]["params"]["params.yaml"]["data"]["data"]["n_train"] == 24  # smoke size
    metrics = exp["data"]["metrics"]
    for task in TASK_NAMES:
        assert {"pretrained", "scratch"} <= set(metrics[f"metrics/{task}.json"]["data"])
    registered = json.loads(_show(repo, exp["rev"], "reports/registry/registered.json"))
    assert {r["model"] for r in registered} == {f"vlp-{t}-smoke" for t in TASK_NAMES}
    promotion = json.loads(_show(repo, exp["rev"], "reports/registry/promotion.json"))
    assert {d["task"] for d in promotion} == set(TASK_NAMES)
    assert all(d.get("model", "-smoke").endswith("-smoke") for d in promotion), promotion

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    production = client.search_model_versions("name='vlp-retrieval'")
    assert [str(v.version) for v in production] == ["1"]  # the champion registered above
    aliases = {
        m.name: {k: str(v) for k, v in m.aliases.items()} for m in client.search_registered_models()
    }
    # each task's first smoke version is the smoke champion; production keeps its own
    assert aliases == {
        "vlp-retrieval": {"champion": "1"},
        **{f"vlp-{t}-smoke": {"champion": "1"} for t in TASK_NAMES},
    }
    assert client.get_model_version("vlp-retrieval-smoke", "1").tags["vlp.profile"] == "smoke"
    # one pipeline run for the experiment, the stages' runs nested under it
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`vlp.dvc_experiment` = 'tiny'",
    )
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {"pretrain", "finetune-retrieval-pretrained"} <= {r.info.run_name for r in children}
