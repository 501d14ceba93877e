"""The gate compares scores measured on the exact model it promotes, with commands run by hand.

Finetune, evaluate, finetune again without evaluating, register: the old scores must not
pass for the new model. Real smoke-size models, real `vlp` CLI calls, a real registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from vlp.cli import main
from vlp.config import Config, profile_dir
from vlp.tasks import model_sha256

pytestmark = pytest.mark.slow  # finetunes, evaluates and registers real models

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")
OUT = profile_dir("smoke")  # where `vlp --profile smoke` writes


def test_scores_of_a_replaced_model_are_refused_until_it_is_evaluated(
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

    def vlp(*args: str, overrides: tuple[str, ...] = ()) -> int:
        return main([*settings, *(f"--set={o}" for o in overrides), *args])

    assert vlp("finetune", "retrieval") == 0
    assert vlp("evaluate", "retrieval") == 0
    assert vlp("register", "retrieval") == 0  # version 1, champion
    evaluated = model_sha256(OUT / "models" / "finetuned" / "retrieval-pretrained")
    assert (
        json.loads((OUT / "metrics" / "retrieval.json").read_text())["pretrained"]["model_sha256"]
        == evaluated
    )

    # another model (another learning rate) replaces the evaluated one; metrics/ still holds
    # the old scores
    assert vlp("finetune", "retrieval", overrides=("finetune.retrieval.lr=0.05",)) == 0
    replaced = model_sha256(OUT / "models" / "finetuned" / "retrieval-pretrained")
    assert replaced != evaluated
    capsys.readouterr()
    assert vlp("register", "retrieval") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlp register: error: {OUT}/metrics/retrieval.json: scores are of model")
    assert evaluated[:12] in err and replaced[:12] in err and len(err.splitlines()) == 1
    client = mlflow.MlflowClient(store_cfg.tracking.uri)
    assert [str(v.version) for v in client.search_model_versions("name='vlp-retrieval-smoke'")] == [
        "1"
    ]
    # promote has nothing new to judge: champion stays
    assert vlp("promote", "retrieval") == 2

    assert vlp("evaluate", "retrieval") == 0
    assert vlp("register", "retrieval") == 0  # version 2, challenger
    tags = client.get_model_version("vlp-retrieval-smoke", "2").tags
    assert tags["vlp.model_sha256"] == tags["vlp.evaluated_model_sha256"] == replaced
    capsys.readouterr()
    status = vlp("promote", "retrieval")
    decision = json.loads(capsys.readouterr().out)
    scores = decision["metrics"]
    better = scores["challenger"] > scores["champion"]
    assert (decision["decision"], status) == (("promoted", 0) if better else ("rejected", 3))
