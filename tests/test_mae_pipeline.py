"""The recipe's two steps through `dvc repro` at smoke sizes: MAE, then VLP from its encoder.

The project's own dvc.yaml runs in a temporary git + DVC repo with the smoke profile,
`pretrain_vision.enabled: true` and a ViT image tower, up to the retrieval evaluation and
the linear probe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from tests.data.test_user_dataset import REPO, _dvc, _git
from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.config import write_variant_params

pytestmark = pytest.mark.slow  # the pipeline through `dvc repro` in subprocesses


def test_dvc_repro_pretrains_vision_first_and_starts_vlp_from_its_encoder(
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
    sets = ["pretrain_vision.enabled=true", "model.image_tower=vit"]
    write_variant_params(REPO / "params.yaml", repo / "params.yaml", "smoke", sets)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the pipeline, MAE enabled")

    out = _dvc(repo, "repro", "evaluate@retrieval", "probe", timeout=1800)
    order = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert order.index("pretrain-vision") < order.index("pretrain") < order.index("probe")

    mae = load_file(repo / "models" / "pretrained_vision" / "model.safetensors")
    vision = json.loads((repo / "metrics" / "pretrain_vision.json").read_text())
    assert vision["enabled"] and vision["steps"] == 4  # the smoke profile's max_steps
    probe = json.loads((repo / "metrics" / "probe.json").read_text())
    assert probe["accuracy"]["mae"] is not None  # the trained MAE encoder was probed
    evaluated = json.loads((repo / "metrics" / "retrieval.json").read_text())
    assert {"pretrained", "scratch"} <= set(evaluated)
    # pretraining recorded the MAE it started from, by content hash
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'pretrain'"
    )
    assert len(runs) == 1 and runs[0].data.tags.get("vlp.input.pretrain_vision.out_dir")
    assert "vit.embeddings.patch_embeddings.projection.weight" in mae

    plots = _dvc(repo, "plots", "show", "--json")
    assert "plots/pretrain_vision_reconstructions.png" in plots
    assert "plots/pretrain_vision_loss.csv" in plots
    assert json.loads(_dvc(repo, "status", "--json", "probe")) == {}
