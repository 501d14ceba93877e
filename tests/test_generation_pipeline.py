"""Generation through the pipeline at smoke sizes: `dvc repro` finetunes both inits and
evaluates them, `vlp register` / `vlp promote` gate the model, and the served champion answers
a prompt with a PNG over REST.

The project's own dvc.yaml runs in a temporary git + DVC repo with the smoke profile.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from tests.data.test_user_dataset import BIN, REPO, _dvc, _git
from tests.mlflow_helpers import empty_store, free_port, http_process  # noqa: F401
from vlp.config import write_variant_params

pytestmark = pytest.mark.slow  # the pipeline through `dvc repro`, then a model server

PROMPT = "a large red circle at the top left"


def _vlp(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VLP_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [str(BIN / "vlp"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"vlp {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_generation_is_finetuned_evaluated_registered_and_served(
    tmp_path: Path,
    empty_store: Path,  # noqa: F811
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    for name in (".gitignore", "dvc.yaml", "profiles.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "vlp", repo / "vlp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(empty_store, repo / "mlflow.db")
    write_variant_params(REPO / "params.yaml", repo / "params.yaml", "smoke", [])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the pipeline at smoke sizes")

    out = _dvc(repo, "repro", "evaluate@generation", timeout=1800)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert {"finetune@generation-pretrained", "finetune@generation-scratch"} <= set(ran)
    assert ran.index("pretrain") < ran.index("finetune@generation-pretrained")
    assert ran[-1] == "evaluate@generation"
    doc = json.loads((repo / "metrics" / "generation.json").read_text())
    assert doc["exact_match"] == doc["pretrained"]["exact_match"]
    assert {"exact_match_no_rerank", "rerank_gain", "itc_score"} <= set(doc["delta"])
    plots = _dvc(repo, "plots", "show", "--json")
    for plot in ("results/generation/gallery_pretrained.png", "generation_scores"):
        assert plot in plots
    assert json.loads(_dvc(repo, "status", "--json", "evaluate@generation")) == {}

    _vlp(repo, "register", "generation", "--out", "registered.json")
    registered = json.loads((repo / "registered.json").read_text())
    assert registered[0]["exact_match"] == doc["exact_match"]
    assert registered[0]["promotion"]["decision"] == "promoted"  # the first version
    tracking = f"sqlite:///{repo / 'mlflow.db'}"
    version = mlflow.MlflowClient(tracking).get_model_version_by_alias("vlp-generation", "champion")
    assert version.tags["vlp.primary_metric"] == "exact_match"

    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "models", "serve", "-m", "models:/vlp-generation@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": tracking, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", env=env, timeout=240):
        body = {
            "dataframe_split": {"columns": ["prompt"], "data": [[PROMPT]]},
            "params": {"sample_steps": 2},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    png = Image.open(io.BytesIO(base64.b64decode(answer["predictions"][0]["image"])))
    size = json.loads(
        (repo / "models" / "finetuned" / "generation-pretrained" / "task.json").read_text()
    )["generated_size"]
    assert png.format == "PNG" and png.size == (size, size)
