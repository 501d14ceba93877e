"""A profile's flow run: its own registered models, the user's tracked data, refusals kept."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import mlflow
import pytest

from flows.pipeline import vlp_pipeline
from tests.mlflow_helpers import STANDIN, STANDIN_LOADER, evaluated_metrics, make_standin_model
from vlp.config import Config, load_config
from vlp.errors import DataError
from vlp.registry import register_model
from vlp.tasks import TASKS

pytestmark = pytest.mark.slow  # the Prefect flow, a Prefect server and `dvc repro` subprocesses

# Stages of the tiny repos below: `read` reads data.root; `register` registers a stand-in
# retrieval model scored on data identified by data.n_test, as the pipeline's register
# stage would; `promote` is the pipeline's own gate.
STAGE_SCRIPT = """
import json
import sys
from pathlib import Path

from vlp.config import Config, load_config

name = sys.argv[1]
cfg = load_config("params.yaml")
out = Path("out")
out.mkdir(exist_ok=True)
if name == "read":
    text = (Path(cfg.data.root) / "a.txt").read_text()
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/read.json").write_text(json.dumps({"length": len(text)}))
else:
    from vlp.registry import register_model
    from vlp.tasks import TASKS, model_sha256

    model = Path("standin")
    model.mkdir(exist_ok=True)
    (model / "standin.json").write_text(json.dumps({"word": "smoke"}))
    evaluated_on = {"split": "test", "data": "data", "data_hash": f"n_test={cfg.data.n_test}"}
    metrics = {
        TASKS["retrieval"].primary_metric: 0.9,
        "model_sha256": model_sha256(model),
        "evaluated_on": evaluated_on,
    }
    done = register_model(
        cfg, "retrieval", model, metrics,
        loader="standin_predictor:load_predictor", extra_code_paths=[Path(sys.argv[2])],
    )
    (out / "registered.json").write_text(json.dumps(done))
"""


def _sh(repo: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout


def _commit(repo: Path, dvc_yaml: str, message: str) -> None:
    """`dvc_yaml` and the stage script of this module, committed to `repo`."""
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    (repo / "dvc.yaml").write_text(dvc_yaml.replace("PY", sys.executable))
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


def _experiments(repo: Path) -> dict[str, dict]:
    shown = json.loads(_sh(repo, sys.executable, "-m", "dvc", "exp", "show", "--json"))
    return {
        e["name"]: e["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for e in exp["revs"]
    }


def _dvc_add(repo: Path, folder: str, text: str) -> None:
    data = repo / folder
    data.mkdir(parents=True)
    (data / "a.txt").write_text(text)
    _sh(repo, sys.executable, "-m", "dvc", "add", "-q", folder)


READ_PIPELINE = """stages:
  read:
    cmd: PY stage.py read
    deps: [stage.py, "${data.root}"]
    metrics: [metrics/read.json: {cache: false}]
"""


def test_a_variant_reads_a_dvc_added_dataset_or_an_absolute_data_root(
    dvc_repo: Path, tmp_path: Path
) -> None:
    _dvc_add(dvc_repo, "data/photos", "inside")  # as the README says: dvc add, data.root
    params = dvc_repo / "params.yaml"
    params.write_text(params.read_text().replace("root: data/shapes", "root: data/photos"))
    _commit(dvc_repo, READ_PIPELINE, "photos")

    vlp_pipeline(repo=str(dvc_repo), profile="smoke", experiment="inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_text("outside!")
    vlp_pipeline(
        repo=str(dvc_repo), profile="smoke", overrides=[f"data.root={outside}"], experiment="out"
    )

    exps = _experiments(dvc_repo)
    assert exps["inside"]["metrics"]["metrics/read.json"]["data"] == {"length": 6}
    assert exps["out"]["metrics"]["metrics/read.json"]["data"] == {"length": 8}
    assert not (dvc_repo / "metrics").exists()  # the workspace is left alone


def test_a_variant_refuses_data_it_cannot_have_before_any_stage_runs(dvc_repo: Path) -> None:
    loose = dvc_repo / "data" / "loose"
    loose.mkdir(parents=True)
    (loose / "a.txt").write_text("untracked")
    (dvc_repo / ".gitignore").write_text((dvc_repo / ".gitignore").read_text() + "data/loose/\n")
    _dvc_add(dvc_repo, "data/photos", "tracked")
    _commit(dvc_repo, READ_PIPELINE, "photos")
    cases = [
        (["data.root=data/loose"], r"data\.root: data/loose is not in the variant's worktree"),
        (
            ["data.root=data/photos", "evaluate.data_root=/no/such/data"],
            r"evaluate\.data_root: /no/such/data not found",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(DataError, match=message):
            vlp_pipeline(repo=str(dvc_repo), profile="smoke", overrides=overrides)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")  # the tracked dataset's files are gone too
    with pytest.raises(DataError, match=r"data/photos\.dvc: cannot check the tracked data out"):
        vlp_pipeline(repo=str(dvc_repo), profile="smoke", overrides=["data.root=data/photos"])

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dvc_repo / 'mlflow.db'}")
    assert client.search_runs(["1"]) == []  # no pipeline run was opened: nothing ran
    assert _sh(dvc_repo, "git", "worktree", "list").count("\n") == 1
    assert _experiments(dvc_repo) == {}


def _aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def _register_standin(cfg: Config, eval_hash: str, folder: Path) -> str:
    model = make_standin_model(folder / eval_hash, "champion")
    metrics = evaluated_metrics(
        model, {TASKS["retrieval"].primary_metric: 0.5}, data_hash=eval_hash
    )
    return register_model(
        cfg,
        "retrieval",
        model,
        metrics,
        loader=STANDIN_LOADER,
        extra_code_paths=[STANDIN],
    )["model"]


def test_a_profile_run_registers_apart_and_keeps_a_refused_promotion(
    dvc_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _commit(
        dvc_repo,
        f"""stages:
  register:
    cmd: PY stage.py register {STANDIN}
    deps: [stage.py]
    params: [data.n_test]
    outs: [out/registered.json: {{cache: false}}]
  promote:
    cmd: PY -m vlp.cli promote all --pipeline --out out/promotion.json
    deps: [out/registered.json]
    outs: [out/promotion.json: {{cache: false}}]
""",
        "registry stages",
    )
    uri = f"sqlite:///{dvc_repo / 'mlflow.db'}"
    with chdir(dvc_repo), monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config("params.yaml")
        # the default pipeline's champion, and a smoke champion scored on other data
        assert _register_standin(cfg, "n_test=500", tmp_path) == "vlp-retrieval"
        smoke = dataclasses.replace(cfg, profile="smoke")
        assert _register_standin(smoke, "n_test=other", tmp_path) == "vlp-retrieval-smoke"

    results = vlp_pipeline(repo=str(dvc_repo), profile="smoke", experiment="smoke-refused")

    assert results[-1]["stage"] == "promote" and results[-1]["outcome"] == "refused"
    client = mlflow.MlflowClient(tracking_uri=uri)
    production = client.search_model_versions("name='vlp-retrieval'")
    assert [str(v.version) for v in production] == ["1"]
    assert _aliases(client, "vlp-retrieval") == {"champion": "1"}
    assert _aliases(client, "vlp-retrieval-smoke") == {"champion": "1", "challenger": "2"}
    refused = client.get_model_version("vlp-retrieval-smoke", "2").tags
    assert refused["vlp.last_decision"] == "refused" and refused["vlp.profile"] == "smoke"
    assert "smoke-refused" in _experiments(dvc_repo)  # the run is kept, refusal included
