"""Evaluate on another split, register, promote: the evidence is what evaluation read.

Real smoke-size models, real `vlp` CLI calls with overridden folders, a real registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from vlp.cli import main
from vlp.config import Config, load_config
from vlp.data.manifest import dataset_hash
from vlp.tasks import finetuned_name, model_sha256

pytestmark = pytest.mark.slow  # finetunes, evaluates and registers a real model

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")
SMOKE_MODEL = "vlp-retrieval-smoke"  # a profile registers under its own names


def _run_tags(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    """Tags of the latest run named `name`."""
    exp = client.get_experiment_by_name("vlp").experiment_id
    runs = client.search_runs(
        [exp], f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0].data.tags


def test_a_model_scored_on_val_is_neither_compared_with_test_scores_nor_with_itself(
    store_cfg: Config,
    smoke_data: Path,
    smoke_pretrained: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_cfg.tracking.uri)
    settings = [
        "--params", PARAMS, "--profile", "smoke",
        "--set", f"data.root={smoke_data}",
        "--set", f"finetune.init_dir={smoke_pretrained}",
        "--set", "finetune.ablation=false",
    ]  # fmt: skip

    def vlp(*args: str, split: str = "test") -> int:
        return main([*settings, "--set", f"evaluate.split={split}", *args])

    assert vlp("finetune", "retrieval") == 0
    assert vlp("evaluate", "retrieval") == 0
    assert vlp("register", "retrieval") == 0  # version 1, champion
    assert vlp("evaluate", "retrieval", split="val") == 0
    smoke = load_config(PARAMS, profile="smoke")  # where the profile's outputs go
    metrics = Path(smoke.runtime.metrics_dir) / "retrieval.json"
    evidence = json.loads(metrics.read_text())["evaluated_on"]
    data_hash = dataset_hash(smoke_data)
    assert evidence == {"split": "val", "data": str(smoke_data), "data_hash": data_hash}
    assert vlp("register", "retrieval") == 0  # version 2: the same model, its val scores

    client = mlflow.MlflowClient(store_cfg.tracking.uri)
    model = model_sha256(Path(smoke.finetune.out_dir) / finetuned_name("retrieval"))
    for version, split in (("1", "test"), ("2", "val")):
        tags = client.get_model_version(SMOKE_MODEL, version).tags
        assert (tags["vlp.eval_split"], tags["vlp.eval_data"]) == (split, str(smoke_data))
        assert (tags["vlp.eval_data_hash"], tags["vlp.model_sha256"]) == (data_hash, model)
    capsys.readouterr()
    assert vlp("promote", "retrieval") == 3  # kept
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "unchanged" and "nothing to gain" in decision["why"]
    assert str(client.get_model_version_by_alias(SMOKE_MODEL, "champion").version) == "1"

    # each run names what it opened: the overridden folders, by content hash
    finetune = _run_tags(client, "finetune-retrieval-pretrained")
    assert finetune["vlp.input.init"] == model_sha256(smoke_pretrained)
    assert finetune["vlp.input.init.path"] == str(smoke_pretrained)
    assert finetune["vlp.input.data"] == data_hash
    evaluate = _run_tags(client, "evaluate-retrieval")
    assert (evaluate["vlp.input.model"], evaluate["vlp.input.data"]) == (model, data_hash)
    register = _run_tags(client, "register-retrieval")
    assert (register["vlp.input.model"], register["vlp.eval_split"]) == (model, "val")
    # the session's pretrained model was trained on the same data (its own store, beside it)
    pretrain_store = mlflow.MlflowClient(f"sqlite:///{smoke_pretrained.parent / 'mlflow.db'}")
    assert _run_tags(pretrain_store, "pretrain")["vlp.input.data"] == data_hash
