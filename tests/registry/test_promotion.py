"""Registry: challenger/champion aliases, the promotion gate, decisions and rollback."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from tests.mlflow_helpers import (
    STANDIN,
    STANDIN_LOADER,
    evaluated_metrics,
    make_standin_model,
    png_bytes,
)
from vlp.config import Config
from vlp.errors import RegistryError, ResultsError
from vlp.registry import promote, promote_all, register_model, register_task_models, rollback
from vlp.tasks import TASKS, model_sha256


def _register(
    cfg: Config, task: str, word: str, value: float, split: str = "test", data_hash: str = "d1"
) -> str:
    metric = TASKS[task].primary_metric
    model_dir = make_standin_model(Path(f"models/{task}-{word}"), word)
    out = register_model(
        cfg,
        task,
        model_dir,
        evaluated_metrics(
            model_dir, {metric: value, "extra": {"B@4": 0.1}}, split=split, data_hash=data_hash
        ),
        loader=STANDIN_LOADER,
        extra_code_paths=[STANDIN],
    )
    return out["version"]


def _aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def _tags(name: str, version: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(name, version).tags


def test_gate_promotes_only_better_challengers_and_rollback_restores(store_cfg: Config) -> None:
    cfg, name = store_cfg, "vlp-captioning"
    assert _register(cfg, "captioning", "alpha", 0.5) == "1"
    assert _aliases(name) == {"champion": "1"}  # first version: champion straight away
    assert json.loads(_tags(name, "1")["vlp.decisions"])[0]["why"].startswith("no champion yet")

    _register(cfg, "captioning", "beta", 0.4)
    assert _aliases(name) == {"champion": "1", "challenger": "2"}
    decision = promote(cfg, "captioning")
    assert decision["decision"] == "rejected" and decision["champion"] == "1"
    assert _aliases(name) == {"champion": "1", "challenger": "2"}
    tags = _tags(name, "2")
    assert tags["vlp.last_decision"] == "rejected"
    assert json.loads(tags["vlp.last_metrics"]) == {
        "metric": "CIDEr",
        "challenger": 0.4,
        "champion": 0.5,
    }
    assert tags["vlp.last_by"] and tags["vlp.last_at"]
    assert _tags(name, "1")["vlp.last_decision"] == "defended"

    _register(cfg, "captioning", "gamma", 0.9)
    decision = promote(cfg, "captioning", reason="nightly")
    assert decision["decision"] == "promoted" and "nightly" in decision["why"]
    assert _aliases(name) == {"champion": "3"}
    assert _tags(name, "1")["vlp.last_decision"] == "replaced"

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.predict(pd.DataFrame({"image": [png_bytes(12)]}))["caption"][0] == "gamma 12x12"

    assert rollback(cfg, "captioning", reason="bad outputs")["champion"] == "1"
    assert _aliases(name)["champion"] == "1"
    assert _tags(name, "3")["vlp.last_decision"] == "rolled back"
    assert "bad outputs" in _tags(name, "3")["vlp.last_why"]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(cfg, "captioning")


def test_different_eval_data_is_refused_unless_forced(store_cfg: Config) -> None:
    _register(store_cfg, "vqa", "a", 0.3, data_hash="d1")
    _register(store_cfg, "vqa", "b", 0.9, data_hash="d2")
    refused = promote(store_cfg, "vqa")
    assert refused["decision"] == "refused" and "different data" in refused["why"]
    assert "version 2: test of data/shapes (data d2)" in refused["why"]
    assert "champion version 1: test of data/shapes (data d1)" in refused["why"]
    assert _aliases("vlp-vqa")["champion"] == "1"
    forced = promote(store_cfg, "vqa", force=True, reason="new test split")
    assert forced["decision"] == "promoted"
    assert _aliases("vlp-vqa")["champion"] == "2"


def test_another_split_or_unrecorded_data_is_refused_naming_both(store_cfg: Config) -> None:
    _register(store_cfg, "vqa", "a", 0.3)
    _register(store_cfg, "vqa", "b", 0.9, split="val")
    refused = promote(store_cfg, "vqa")
    assert refused["decision"] == "refused"
    assert "version 2: val of data/shapes (data d1)" in refused["why"]
    assert "champion version 1: test of data/shapes (data d1)" in refused["why"]
    # a champion registered without the record (by hand, or by older code) is no yardstick
    _set_tag("vlp-vqa", "1", "vlp.eval_split", None)
    _register(store_cfg, "vqa", "c", 0.9)
    refused = promote(store_cfg, "vqa")
    assert refused["decision"] == "refused"
    assert "champion version 1: no recorded evaluation data" in refused["why"]
    assert _aliases("vlp-vqa") == {"champion": "1", "challenger": "3"}


def test_a_model_is_never_promoted_over_itself(store_cfg: Config) -> None:
    # one model directory: registered with its test scores, then with its (higher) val scores
    model_dir = make_standin_model(Path("models/retrieval"), "w")
    for split, rsum in (("test", 1.0), ("val", 2.0)):
        register_model(
            store_cfg,
            "retrieval",
            model_dir,
            evaluated_metrics(model_dir, {"rsum": rsum}, split=split),
            loader=STANDIN_LOADER,
            extra_code_paths=[STANDIN],
        )
    for force in (False, True):
        decision = promote(store_cfg, "retrieval", force=force)
        assert decision["decision"] == "unchanged"
        assert decision["why"].startswith(
            f"version 2 is the same model as champion version 1 (model {model_sha256(model_dir)[:12]})"
            ": nothing to gain"
        )
    assert _aliases("vlp-retrieval") == {"champion": "1", "challenger": "2"}
    assert _tags("vlp-retrieval", "2")["vlp.last_decision"] == "unchanged"
    tags = _tags("vlp-retrieval", "2")
    assert (tags["vlp.eval_split"], tags["vlp.eval_data"], tags["vlp.eval_data_hash"]) == (
        "val",
        "data/shapes",
        "d1",
    )


def test_every_task_loads_as_a_pyfunc_with_a_signature(store_cfg: Config) -> None:
    image = png_bytes(10)
    inputs = {
        "captioning": pd.DataFrame({"image": [image]}),
        "vqa": pd.DataFrame({"image": [image], "question": ["what?"]}),
        "retrieval": pd.DataFrame({"image": [image, image], "text": ["a", "abc"]}),
        "generation": pd.DataFrame({"prompt": ["a red circle", "two"]}),
    }
    expected = {
        "captioning": ("caption", ["w 10x10"]),
        "vqa": ("answer", ["w 5"]),
        "retrieval": ("score", [11.0, 13.0]),
        # PNGs (base64) as wide as the prompt and as tall as the request's steps
        "generation": ("image", [(12, 3), (3, 3)]),
    }
    for task in TASKS:
        _register(store_cfg, task, "w", 1.0)
        model = mlflow.pyfunc.load_model(f"models:/vlp-{task}@champion")
        first_input = TASKS[task].inputs[0][0]
        assert model.metadata.get_input_schema().input_names()[0] == first_input
        column, values = expected[task]
        out = model.predict(inputs[task], params={"sample_steps": 3})[column].tolist()
        if task == "generation":
            out = [Image.open(io.BytesIO(base64.b64decode(png))).size for png in out]
        assert out == values


def test_generation_without_exact_match_is_gated_by_its_itc_score(store_cfg: Config) -> None:
    """Captions no scene parser reads (photos) have no exact match: itc_score gates instead,
    and only versions scored by the same metric compare."""

    def register(word: str, scores: dict[str, float], data_hash: str = "d1") -> dict:
        model_dir = make_standin_model(Path(f"models/generation-{word}"), word)
        return register_model(
            store_cfg,
            "generation",
            model_dir,
            evaluated_metrics(model_dir, scores, data_hash=data_hash),
            loader=STANDIN_LOADER,
            extra_code_paths=[STANDIN],
        )

    assert register("a", {"itc_score": 20.0})["itc_score"] == 20.0
    assert _tags("vlp-generation", "1")["vlp.primary_metric"] == "itc_score"
    register("b", {"itc_score": 25.0})
    decision = promote(store_cfg, "generation")
    assert decision["decision"] == "promoted" and decision["why"].startswith("itc_score 25")
    # the primary metric wins where there is one; unlike scores never compare
    register("c", {"exact_match": 90.0, "itc_score": 10.0})
    assert _tags("vlp-generation", "3")["vlp.primary_metric"] == "exact_match"
    assert promote(store_cfg, "generation")["decision"] == "refused"


def test_pipeline_gate_respects_auto_promote(store_cfg: Config) -> None:
    _register(store_cfg, "retrieval", "a", 1.0)
    _register(store_cfg, "retrieval", "b", 2.0)
    off = dataclasses.replace(
        store_cfg, registry=dataclasses.replace(store_cfg.registry, auto_promote=False)
    )
    assert {d["decision"] for d in promote_all(off, pipeline=True)} == {"skipped"}
    assert _aliases("vlp-retrieval")["champion"] == "1"
    decisions = {d["task"]: d["decision"] for d in promote_all(store_cfg, pipeline=True)}
    assert decisions == {
        "retrieval": "promoted",
        "captioning": "unchanged",
        "vqa": "unchanged",
        "generation": "unchanged",
    }
    assert _aliases("vlp-retrieval")["champion"] == "2"


def test_register_reports_missing_pipeline_outputs(store_cfg: Config) -> None:
    with pytest.raises(ResultsError, match="retrieval.json"):
        register_task_models(store_cfg, "retrieval")
    metrics = Path(store_cfg.runtime.metrics_dir)
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "vqa.json").write_text(json.dumps({"yes/no": 1.0}))
    with pytest.raises(ResultsError, match="'overall'"):
        register_task_models(store_cfg, "vqa")
    (metrics / "vqa.json").write_text(json.dumps({"pretrained": {"overall": 50.0}}))
    with pytest.raises(RegistryError, match="model directory not found"):
        register_task_models(store_cfg, "vqa")
    with pytest.raises(RegistryError, match="no 'challenger'"):
        promote(store_cfg, "vqa")


def test_cli_promote_and_rollback(
    store_cfg: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from vlp.cli import main

    params = str(Path(__file__).resolve().parents[2] / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_cfg.tracking.uri)
    assert main(["--params", params, "rollback", "vqa"]) == 2
    assert "vlp-vqa: no such registered model" in capsys.readouterr().err
    _register(store_cfg, "vqa", "a", 0.2)
    _register(store_cfg, "vqa", "b", 0.1)
    out = Path("decisions.json")
    assert main(["--params", params, "promote", "all", "--pipeline", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[2]["decision"] == "rejected"
    assert main(["--params", params, "promote", "vqa", "--force", "--reason", "try b"]) == 0
    assert _aliases("vlp-vqa")["champion"] == "2"
    assert main(["--params", params, "rollback", "vqa"]) == 0
    assert _aliases("vlp-vqa")["champion"] == "1"


def _set_tag(name: str, version: str, key: str, value: str | None) -> None:
    """Edit a version's tag as someone registering by hand (or older code) would leave it."""
    client = mlflow.MlflowClient()
    if value is None:
        client.delete_model_version_tag(name, version, key)
    else:
        client.set_model_version_tag(name, version, key, value)


def test_register_refuses_metrics_not_measured_on_the_registered_model(
    store_cfg: Config,
) -> None:
    cfg = dataclasses.replace(
        store_cfg,
        runtime=dataclasses.replace(store_cfg.runtime, metrics_dir="metrics"),
        evaluate=dataclasses.replace(store_cfg.evaluate, models_dir="finetuned"),
    )
    model_dir = make_standin_model(Path("finetuned/vqa-pretrained"), "new")
    other = make_standin_model(Path("finetuned/old"), "old")
    metrics_file = Path("metrics/vqa.json")
    metrics_file.parent.mkdir()
    metrics_file.write_text(json.dumps({"overall": 50.0}))
    with pytest.raises(RegistryError, match=r"metrics/vqa\.json: records no 'model_sha256'"):
        register_task_models(cfg, "vqa")
    metrics_file.write_text(
        json.dumps({"overall": 50.0, "pretrained": {"model_sha256": model_sha256(other)}})
    )
    with pytest.raises(RegistryError) as err:
        register_task_models(cfg, "vqa")
    message = str(err.value)
    assert message.startswith("metrics/vqa.json: scores are of model ")
    assert model_sha256(other)[:12] in message and model_sha256(model_dir)[:12] in message
    assert mlflow.MlflowClient(cfg.tracking.uri).search_registered_models() == []

    metrics_file.write_text(
        json.dumps({"overall": 50.0, "pretrained": {"model_sha256": model_sha256(model_dir)}})
    )
    with pytest.raises(RegistryError, match=r"metrics/vqa\.json: records no 'evaluated_on'"):
        register_task_models(cfg, "vqa")
    assert mlflow.MlflowClient(cfg.tracking.uri).search_registered_models() == []

    version = _register(cfg, "vqa", "a", 0.3)
    tags = _tags("vlp-vqa", version)
    expected = model_sha256(Path("models/vqa-a"))
    assert tags["vlp.model_sha256"] == tags["vlp.evaluated_model_sha256"] == expected


def test_model_hash_changes_with_any_file_and_not_with_the_location(tmp_path: Path) -> None:
    a = make_standin_model(tmp_path / "a", "w")
    (a / "tokenizer").mkdir()
    (a / "tokenizer" / "vocab.txt").write_text("x\ny\n")
    b = shutil.copytree(a, tmp_path / "elsewhere" / "a")
    assert model_sha256(a) == model_sha256(b)
    (b / "tokenizer" / "vocab.txt").write_text("x\nz\n")
    assert model_sha256(a) != model_sha256(b)
    (b / "tokenizer" / "vocab.txt").write_text("x\ny\n")
    (b / "tokenizer" / "vocab.txt").rename(b / "tokenizer" / "vocab2.txt")
    assert model_sha256(a) != model_sha256(b)


@pytest.mark.parametrize("tampered", [None, "0" * 64])
def test_promote_refuses_a_challenger_whose_scores_are_not_of_its_model_unless_forced(
    store_cfg: Config, tampered: str | None
) -> None:
    _register(store_cfg, "captioning", "a", 0.1)
    _register(store_cfg, "captioning", "b", 0.9)
    _set_tag("vlp-captioning", "2", "vlp.model_sha256", tampered)
    refused = promote(store_cfg, "captioning")
    assert refused["decision"] == "refused"
    assert "not proven to be of its model" in refused["why"]
    assert f"model {(tampered or 'none')[:12]}" in refused["why"]
    assert _aliases("vlp-captioning") == {"champion": "1", "challenger": "2"}
    assert _tags("vlp-captioning", "2")["vlp.last_decision"] == "refused"
    forced = promote(store_cfg, "captioning", force=True, reason="checked by hand")
    assert forced["decision"] == "promoted" and "forced although" in forced["why"]
    assert _aliases("vlp-captioning") == {"champion": "2"}


def test_cli_promote_exit_status_tells_promoted_kept_and_refused(
    store_cfg: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from vlp.cli import main

    params = str(Path(__file__).resolve().parents[2] / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_cfg.tracking.uri)

    def promote_cli(*args: str) -> int:
        return main(["--params", params, "promote", *args])

    _register(store_cfg, "vqa", "a", 0.2)
    _register(store_cfg, "vqa", "b", 0.1)
    assert promote_cli("vqa") == 3  # rejected: kept
    assert promote_cli("all") == 3
    assert promote_cli("all", "--pipeline") == 0  # the pipeline's gate kept the champion

    _register(store_cfg, "vqa", "c", 0.9)
    _set_tag("vlp-vqa", "3", "vlp.evaluated_model_sha256", None)
    capsys.readouterr()
    assert promote_cli("vqa") == 4
    assert "vlp promote: error: vlp-vqa version 3 refused" in capsys.readouterr().err
    assert promote_cli("all", "--pipeline") == 4  # refused is most severe: the stage fails
    assert _aliases("vlp-vqa")["champion"] == "1"

    _register(store_cfg, "vqa", "d", 0.8)
    assert promote_cli("vqa") == 0
    assert _aliases("vlp-vqa") == {"champion": "4"}
    assert promote_cli("vqa") == 2  # no challenger left: a user error
