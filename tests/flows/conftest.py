"""One Prefect test server for the whole session, and tiny DVC repos to run flows in."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_helpers import empty_store, git_init  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]

STAGE_SCRIPT = '''
"""A tiny stage: reads params, writes its output; `train` also opens a vlp stage run."""
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from vlp.config import load_config
from vlp.lineage import profile_label

name = sys.argv[1]
cfg = load_config("params.yaml")
if name == "flaky" and not Path("flaky.marker").exists():
    Path("flaky.marker").write_text("failed once")
    sys.exit(1)  # a transient failure: the retry succeeds
if name == "train":
    from vlp.tracking import stage_run

    run = stage_run(cfg, name)
else:
    run = nullcontext()
with run:
    out = Path("out") / f"{name}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"{profile_label(cfg)} {cfg.pretrain.lr}")
    if name == "train":
        Path("metrics").mkdir(exist_ok=True)
        Path("metrics/train.json").write_text(json.dumps({"lr_x1000": cfg.pretrain.lr * 1000}))
'''


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """A temporary Prefect API for every flow test (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_dvc_repo(path: Path, store: Path) -> Path:
    """A git + DVC repo with the project's params.yaml and three tiny chained stages."""
    path.mkdir(parents=True)
    git_init(path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    shutil.copy(REPO_ROOT / "params.yaml", path / "params.yaml")
    shutil.copy(REPO_ROOT / "profiles.yaml", path / "profiles.yaml")
    shutil.copy(store, path / "mlflow.db")
    (path / "stage.py").write_text(STAGE_SCRIPT)
    py = sys.executable
    (path / "dvc.yaml").write_text(
        f"""stages:
  train:
    cmd: {py} stage.py train
    deps: [stage.py, out/generate.txt]
    params: [pretrain.lr]
    outs: [out/train.txt]
    metrics: [metrics/train.json: {{cache: false}}]
  generate:
    cmd: {py} stage.py generate
    deps: [stage.py]
    params: [data.seed]
    outs: [out/generate.txt]
  flaky:
    cmd: {py} stage.py flaky
    deps: [out/train.txt]
    outs: [out/flaky.txt]
"""
    )
    (path / ".gitignore").write_text("mlflow.db\nmlartifacts/\nflaky.marker\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "repo"],
        cwd=path,
        check=True,
    )
    return path


@pytest.fixture
def dvc_repo(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """A fresh tiny DVC repo whose retries wait 0 s; the MLflow store lives inside it."""
    for var in ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    repo = make_dvc_repo(tmp_path / "repo", empty_store)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("retry_delay_s: 30.0", "retry_delay_s: 0.0"))
    return repo
