"""Model selection on the val split in the finetune stage: real finetuning, real scoring
through each task's evaluation, a real MLflow store, the val curve as a DVC plot."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tests.mlflow_helpers import empty_store  # noqa: F401
from tests.test_finetune import cfg  # noqa: F401
from vlp.config import Config
from vlp.errors import ConfigError, DataError
from vlp.evaluate import evaluate_model
from vlp.finetune import finetune, loss_curve_path, val_curve_path
from vlp.tasks import get_task

pytestmark = pytest.mark.slow  # finetuning and scoring real models

REPO = Path(__file__).resolve().parents[1]
VAL_KEYS = {"val_metric", "val_best_step", "val_best_value", "val_scorings", "stopped_early"}


def _with(config: Config, task: str, **over: object) -> Config:
    section = dataclasses.replace(config.finetune.task(task), **over)
    return dataclasses.replace(
        config, finetune=dataclasses.replace(config.finetune, **{task: section})
    )


def _curve(config: Config, task: str) -> list[dict[str, str]]:
    return list(csv.DictReader(val_curve_path(config, task, "pretrained").open()))


def _val_score(config: Config, model_dir: Path) -> dict[str, float]:
    """The task's own evaluation of a saved model on the val split of the finetuning data."""
    on_val = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, split="val"))
    return evaluate_model(on_val, model_dir).metrics


def _run(tmp_path: Path, name: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return next(r for r in client.search_runs(exps) if r.info.run_name == name)


def test_selection_saves_the_best_val_model_and_leaves_training_unchanged(
    cfg: Config,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vlp.finetune
    from vlp.models import VLPModel

    scored: dict[int, dict[str, torch.Tensor]] = {}  # the weights each scoring saw
    real_scorer = vlp.finetune.val_scorer

    def watched_scorer(*args: object) -> Callable[[int], dict[str, float]]:
        score, module = real_scorer(*args), args[2]

        def watched(step: int) -> dict[str, float]:
            scored[step] = {k: v.clone() for k, v in module.model.state_dict().items()}
            return score(step)

        return watched

    monkeypatch.setattr(vlp.finetune, "val_scorer", watched_scorer)
    plain_dir = finetune(cfg, "retrieval")
    plain_loss = loss_curve_path(cfg, "retrieval", "pretrained")
    plain_curve = plain_loss.read_text()
    assert json.loads((plain_dir / "task.json").read_text()).keys().isdisjoint(VAL_KEYS)
    assert val_curve_path(cfg, "retrieval", "pretrained").read_text() == "step,metric,score,best\n"

    on = _with(cfg, "retrieval", val_every=1, max_steps=4)
    off = _with(cfg, "retrieval", max_steps=4)
    shutil.rmtree(plain_dir)
    off_weights = (finetune(off, "retrieval") / "model.safetensors").read_bytes()
    off_loss = plain_loss.read_text()
    assert off_loss != plain_curve  # a longer run (sanity of the comparison below)
    out = finetune(on, "retrieval")
    # scoring on val draws no randomness and moves nothing: the same training steps
    assert plain_loss.read_text() == off_loss

    rows = _curve(on, "retrieval")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {r["metric"] for r in rows} == {"rsum"}
    scores = [float(r["score"]) for r in rows]
    best_step = 1 + scores.index(max(scores))  # the first of equal bests
    assert [int(r["best"]) for r in rows][best_step - 1] == 1
    info = json.loads((out / "task.json").read_text())
    assert info["val_metric"] == "rsum" and info["val_best_step"] == best_step
    assert info["val_best_value"] == max(scores) and info["val_scorings"] == 4
    assert info["steps"] == 4 and info["stopped_early"] is False
    # the saved model scores its recorded value on val: it is the best step's model ...
    assert _val_score(on, out)["rsum"] == info["val_best_value"]
    # ... which is the last step's (the run without selection) only if the last step was best
    assert ((out / "model.safetensors").read_bytes() == off_weights) == (best_step == 4)
    saved = VLPModel.from_pretrained(out).state_dict()
    assert sorted(scored) == [1, 2, 3, 4] and saved.keys() == scored[best_step].keys()
    for name, weights in scored[best_step].items():
        assert torch.equal(saved[name], weights), name

    run = _run(tmp_path, "finetune-retrieval-pretrained")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val.rsum")
    assert [(m.step, m.value) for m in history] == list(zip([1, 2, 3, 4], scores, strict=True))
    assert run.data.metrics["val_best_step"] == best_step
    assert run.data.metrics["val_best_value"] == max(scores)
    assert run.data.params["finetune.retrieval.val_every"] == "1"
    artifacts = [Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "finetune_retrieval_pretrained_val.csv" in artifacts


@pytest.mark.parametrize("task", ["captioning", "vqa", "generation"])
def test_every_task_selects_by_its_primary_metric_on_val(
    cfg: Config,  # noqa: F811
    task: str,
) -> None:
    on = _with(cfg, task, val_every=2)  # smoke: 3 steps, scored at 2 and at the end
    out = finetune(on, task)
    rows = _curve(on, task)
    primary = get_task(task).primary_metric
    assert [(int(r["step"]), r["metric"]) for r in rows] == [(2, primary), (3, primary)]
    info = json.loads((out / "task.json").read_text())
    scores = {int(r["step"]): float(r["score"]) for r in rows}
    assert info["val_best_value"] == max(scores.values()) == scores[info["val_best_step"]]
    assert _val_score(on, out)[primary] == info["val_best_value"]


def test_a_chosen_val_metric_and_early_stopping(cfg: Config) -> None:  # noqa: F811
    on = _with(cfg, "retrieval", val_every=1, max_steps=6, val_metric="t2i_R@1")
    on = _with(on, "retrieval", early_stopping_patience=1)
    out = finetune(on, "retrieval")
    rows = _curve(on, "retrieval")
    assert {r["metric"] for r in rows} == {"t2i_R@1"}
    scores = [float(r["score"]) for r in rows]
    info = json.loads((out / "task.json").read_text())
    # it stops at the first scoring that does not beat the best so far, else runs to the end
    worse = [i for i in range(1, len(scores)) if scores[i] <= max(scores[:i])]
    assert info["steps"] == (worse[0] + 1 if worse else 6) == len(rows)
    assert info["stopped_early"] is bool(worse)


def test_ranks_and_distances_are_minimised_and_scores_maximised(cfg: Config) -> None:  # noqa: F811
    from vlp.tasks.validation import selection_settings

    def chosen(task: str, metric: str | None) -> tuple[str, bool]:
        s = selection_settings(_with(cfg, task, val_every=1, val_metric=metric), task)
        assert s is not None
        return s.metric, s.maximise

    assert chosen("retrieval", None) == ("rsum", True)
    assert chosen("retrieval", "t2i_medr") == ("t2i_medr", False)
    assert chosen("vqa", None) == ("overall", True)
    assert chosen("generation", "frechet_distance_image_tower")[1] is False
    assert selection_settings(cfg, "captioning") is None  # val_every 0: off


def test_selection_refuses_a_dataset_without_val_and_training_on_val(
    cfg: Config,  # noqa: F811
    tmp_path: Path,
) -> None:
    import pandas as pd

    data = tmp_path / "no_val"
    shutil.copytree(cfg.data.root, data)
    for name in ("pairs.parquet", "vqa.parquet"):
        frame = pd.read_parquet(data / name)
        frame[frame["split"] != "val"].to_parquet(data / name)
    no_val = _with(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data))),
        "vqa",
        val_every=5,
    )
    with pytest.raises(DataError, match=r"finetune.vqa.val_every: .*no vqa rows in split\(s\) val"):
        finetune(no_val, "vqa")
    assert not Path(cfg.finetune.out_dir, "vqa-pretrained").exists()  # refused before training
    trains_on_val = _with(cfg, "captioning", val_every=5)
    trains_on_val = dataclasses.replace(
        trains_on_val, finetune=dataclasses.replace(trains_on_val.finetune, splits=["train", "val"])
    )
    with pytest.raises(ConfigError, match="finetune.captioning.val_every: the 'val' split is also"):
        finetune(trains_on_val, "captioning")
    with pytest.raises(ConfigError, match="val_every: must be >= 0"):
        finetune(_with(cfg, "retrieval", val_every=-1), "retrieval")
    # the EMA would replace the selected weights at the end: one or the other
    with pytest.raises(ConfigError, match="finetune.retrieval.ema_decay: model selection"):
        finetune(_with(cfg, "retrieval", val_every=2, ema_decay=0.9), "retrieval")
    assert not Path(cfg.finetune.out_dir, "retrieval-pretrained").exists()


def test_the_val_curve_is_a_plot_of_every_finetune_stage() -> None:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    plots = {next(iter(p)): next(iter(p.values())) for p in stage["plots"]}
    assert plots["plots/finetune_${item.task}_${item.init}_val.csv"] == {
        "x": "step",
        "y": "score",
        "cache": False,
    }
    views = {
        next(iter(v)): next(iter(v.values()))
        for v in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
        if isinstance(v, dict)
    }
    for task in ("retrieval", "captioning", "vqa", "generation"):  # pretrained vs scratch
        assert views[f"finetune_val_{task}"]["y"] == {
            f"plots/finetune_{task}_{init}_val.csv": "score" for init in ("pretrained", "scratch")
        }
    params = yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]
    for task in ("retrieval", "captioning", "vqa", "generation"):  # off by default
        assert params[task]["val_every"] == 0 and params[task]["early_stopping_patience"] == 0
