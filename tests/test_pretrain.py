"""The pretrain stage on the smoke profile: model dir, metrics, plot CSV and an MLflow run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stage_helpers import isolated_cfg
from vlp.config import Config
from vlp.errors import OutputError
from vlp.pretrain import pretrain

pytestmark = pytest.mark.slow  # pretraining runs, killed and resumed

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs pretrain(cfg) fresh and SIGKILLs its own process after caption warm-up step 3
# (the step-2 warm-up checkpoint is on disk): a kill that leaves no chance to clean up.
KILLED_IN_WARMUP = """
import os, pickle, signal, sys
from pathlib import Path
import vlp.pretrain

cfg = pickle.loads(Path(sys.argv[1]).read_bytes())
real_train = vlp.pretrain.train

def train(model, dataset, collate, settings, out_dir, **kw):
    if Path(out_dir).name == "caption_warmup":
        on_log = kw["on_log"]

        def log_then_die(metrics, step):
            on_log(metrics, step)
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        kw["on_log"] = log_then_die
    return real_train(model, dataset, collate, settings, out_dir, **kw)

vlp.pretrain.train = train
vlp.pretrain.pretrain(cfg)
"""


def pretrain_killed_in_warmup(cfg: Config, tmp_path: Path) -> None:
    """Run a fresh pretrain(cfg) in a subprocess that is SIGKILLed during its warm-up."""
    assert cfg.pretrain.caption_warmup_steps > 3 and cfg.pretrain.checkpoint_every == 2
    cfg_file = tmp_path / "killed_cfg.pkl"
    cfg_file.write_bytes(pickle.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_WARMUP, str(cfg_file)],
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _stage_runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain"]


@pytest.fixture
def cfg(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    return isolated_cfg(smoke_cfg, tmp_path, monkeypatch)


def test_pretrain_writes_model_metrics_plots_and_run(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    from vlp.models import VLPModel

    out = pretrain(cfg)
    VLPModel.from_pretrained(out)
    # the weights the stage trained with are in the run's params, not in the model
    assert "loss_weights" not in json.loads((out / "vlp_config.json").read_text())

    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    warm, joint = cfg.pretrain.caption_warmup_steps, cfg.pretrain.max_steps
    assert warm > 0  # the smoke profile runs both phases
    assert metrics["steps"] == joint
    assert metrics["caption_warmup_steps"] == warm
    assert metrics["caption_warmup_loss_lm_first"] > 0
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert metrics[f"{key}_first"] > 0 and metrics[f"{key}_last"] > 0
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
        assert 0.0 <= metrics[f"zeroshot_{key}"] <= 100.0
    assert metrics["zeroshot_chance_t2i_R@1"] == pytest.approx(100 / cfg.data.n_test)

    rows = list(csv.DictReader((tmp_path / "plots" / "pretrain_loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, warm + joint + 1))
    assert set(rows[0]) == {"step", "loss", "loss_itc", "loss_itm", "loss_lm", "lr"}
    # the caption warm-up trains the LM alone; the joint phase all three objectives
    assert all(r["loss_itc"] == "" and r["loss"] == r["loss_lm"] for r in rows[:warm])
    assert all(float(r["loss_itc"]) > 0 for r in rows[warm:])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("vlp.stage") == "pretrain"
    ]
    history = client.get_metric_history(run.info.run_id, "loss_itc")
    assert [m.step for m in history] == list(range(warm + 1, warm + joint + 1))
    history = client.get_metric_history(run.info.run_id, "loss_lm")
    assert [m.step for m in history] == list(range(1, warm + joint + 1))
    assert run.data.params["pretrain.lr"] == str(cfg.pretrain.lr)
    assert "vlp.git_commit" in run.data.tags
    assert "zeroshot_t2i_R_at_1" in run.data.metrics


def test_pretrain_resume_after_kill_matches_uninterrupted(cfg: Config, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from vlp.pretrain import work_dir
    from vlp.train.checkpoint import list_checkpoints

    out = pretrain(cfg)
    full = load_file(out / "model.safetensors")
    ckpts = list_checkpoints(work_dir(cfg) / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    # a kill between step 2 and 4: the step-4 checkpoint and the final model never appeared
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out)
    pretrain(cfg, resume=True)
    resumed = load_file(out / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    rows = (tmp_path / "plots" / "pretrain_loss.csv").read_text().splitlines()
    # the warm-up's and steps 1-2's history came from the checkpoints
    assert len(rows) == 1 + cfg.pretrain.caption_warmup_steps + cfg.pretrain.max_steps


def test_resume_after_kill_in_the_caption_warmup_matches_uninterrupted(
    cfg: Config, tmp_path: Path
) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from vlp.pretrain import work_dir

    cfg = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, caption_warmup_steps=4)
    )
    out = pretrain(cfg)
    full = load_file(out / "model.safetensors")
    warm = work_dir(cfg) / "caption_warmup" / "checkpoints"
    assert sorted(c.name for c in warm.iterdir()) == [
        ".vlp-output",
        "step-00000002",
        "step-00000004",
    ]
    # a kill between warm-up steps 2 and 4: the joint phase never started
    shutil.rmtree(warm / "step-00000004")
    shutil.rmtree(work_dir(cfg) / "checkpoints")
    shutil.rmtree(out)
    pretrain(cfg, resume=True)
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_warmup_sees_one_caption_per_image(smoke_data: Path) -> None:
    from vlp.data.images import ImageTransform
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import PairsDataset

    pairs = read_pairs(smoke_data, "pretrain")
    square = ImageTransform(32, "squash", (0.5,) * 3, (0.5,) * 3)
    firsts = PairsDataset(smoke_data, "pretrain", square, first_caption_only=True)
    assert len(firsts) == pairs["image_id"].nunique() < len(pairs)
    first_of = pairs.groupby("image_id", sort=False)["caption"].first()
    assert [it["caption"] for it in firsts] == [first_of[it["image_id"]] for it in firsts]


def test_negative_warmup_is_a_config_error(cfg: Config) -> None:
    from vlp.errors import ConfigError

    bad = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, caption_warmup_steps=-1)
    )
    with pytest.raises(ConfigError, match="caption_warmup_steps: must be >= 0"):
        pretrain(bad)


def test_all_objective_weights_zero_is_a_config_error(cfg: Config, tmp_path: Path) -> None:
    from vlp.errors import ConfigError

    off = dataclasses.replace(cfg.pretrain, itc_weight=0.0, itm_weight=0.0, lm_weight=0.0)
    with pytest.raises(ConfigError, match=r"pretrain.itc_weight/itm_weight/lm_weight: .*non-zero"):
        pretrain(dataclasses.replace(cfg, pretrain=off))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run or training


def test_resume_never_continues_checkpoints_of_an_earlier_run(cfg: Config, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from vlp.pretrain import work_dir

    out = pretrain(cfg)  # run A completes: its joint-phase checkpoints stay on disk
    model_a = load_file(out / "model.safetensors")
    other = dataclasses.replace(
        cfg,
        pretrain=dataclasses.replace(cfg.pretrain, lr=cfg.pretrain.lr / 2, caption_warmup_steps=4),
    )
    pretrain_killed_in_warmup(other, tmp_path)  # run B, other params, killed in warm-up
    assert not (work_dir(cfg) / "checkpoints").exists()  # A's were cleared when B started

    pretrain(other, resume=True)
    model_b = load_file(out / "model.safetensors")
    assert not all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["caption_warmup_steps"] == 4 and metrics["steps"] == cfg.pretrain.max_steps
    rows = list(csv.DictReader((tmp_path / "plots" / "pretrain_loss.csv").open()))
    # the joint phase ran, at B's learning rate
    joint_lrs = [float(r["lr"]) for r in rows if r["loss_itc"]]
    assert len(joint_lrs) == cfg.pretrain.max_steps
    assert max(joint_lrs) == pytest.approx(other.pretrain.lr)


def test_resume_marks_the_killed_mlflow_run_and_links_the_two(cfg: Config, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, caption_warmup_steps=4)
    )
    pretrain_killed_in_warmup(cfg, tmp_path)
    (killed,) = _stage_runs(tmp_path)
    assert killed.info.status == "RUNNING"  # the process died without closing it

    pretrain(cfg, resume=True)
    runs = {r.info.run_id: r for r in _stage_runs(tmp_path)}
    killed = runs.pop(killed.info.run_id)
    (resumed,) = runs.values()
    assert killed.info.status == "KILLED" and resumed.info.status == "FINISHED"
    assert killed.data.tags["vlp.resumed_by_run_id"] == resumed.info.run_id
    assert resumed.data.tags["vlp.resumed_from_run_id"] == killed.info.run_id


def test_resume_with_other_params_is_refused(cfg: Config) -> None:
    from vlp.errors import ResumeError

    out = pretrain(cfg)
    before = (out / "model.safetensors").read_bytes()
    other = dataclasses.replace(
        cfg, seed=cfg.seed + 1, pretrain=dataclasses.replace(cfg.pretrain, lr=0.5)
    )
    with pytest.raises(ResumeError, match=r"other params \(pretrain.lr .* seed 0 -> 1\)"):
        pretrain(other, resume=True)
    assert (out / "model.safetensors").read_bytes() == before
    # where and how often progress is saved or shown is not part of what was trained
    cosmetic = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, log_every=3))
    pretrain(cosmetic, resume=True)


def test_resume_with_other_data_is_refused(cfg: Config, smoke_data: Path, tmp_path: Path) -> None:
    import shutil

    from vlp.data.manifest import read_pairs, write_manifest
    from vlp.errors import ResumeError

    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data)))
    pretrain(cfg)
    pairs = read_pairs(data)
    pairs.loc[0, "caption"] = "a caption that was not there before"
    write_manifest(pairs, data / "pairs.parquet")
    with pytest.raises(ResumeError, match=r"other data \("):
        pretrain(cfg, resume=True)


def test_pretrain_refuses_foreign_output_and_work_folders(cfg: Config, tmp_path: Path) -> None:
    from vlp.pretrain import work_dir

    for folder in (Path(cfg.pretrain.out_dir), work_dir(cfg)):
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"someone else's")
        with pytest.raises(OutputError, match=f"{folder}: not empty and not written by vlp"):
            pretrain(cfg)
        assert [p.name for p in folder.iterdir()] == ["weights.bin"]
        (folder / "weights.bin").unlink()  # empty folders are fine to write into
    assert not (tmp_path / "metrics").exists()  # refused before training


@pytest.fixture
def karpathy_like(smoke_data: Path, tmp_path: Path) -> Path:
    """The smoke images under Karpathy-style splits: train, restval and val; no test, no VQA."""
    import shutil

    from vlp.data.manifest import read_pairs, write_manifest

    data = tmp_path / "karpathy"
    shutil.copytree(smoke_data, data)
    (data / "vqa.parquet").unlink()
    pairs = read_pairs(data)
    pairs = pairs[pairs["split"] != "test"].copy()
    pairs["split"] = pairs["split"].map({"pretrain": "train", "train": "restval", "val": "val"})
    write_manifest(pairs, data / "pairs.parquet")
    return data


def _on(cfg: Config, data: Path, **pretrain_params: object) -> Config:
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(data)),
        pretrain=dataclasses.replace(cfg.pretrain, **pretrain_params),
    )


def test_pretrain_without_a_test_split_saves_the_model_and_records_the_skipped_check(
    cfg: Config, karpathy_like: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from vlp.config import load_config
    from vlp.data.manifest import read_pairs
    from vlp.models import VLPModel

    splits = load_config(
        REPO_ROOT / "params.yaml",
        "smoke",
        ["pretrain.splits=[train,restval]", "pretrain.tokenizer_splits=[train,restval]"],
    ).pretrain
    cfg = _on(cfg, karpathy_like, splits=splits.splits, tokenizer_splits=splits.tokenizer_splits)
    assert cfg.pretrain.eval_split == "test"
    out = pretrain(cfg)

    VLPModel.from_pretrained(out)
    note = f"skipped: no 'test' split in {karpathy_like}"
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["zero_shot"] == note
    assert not any(k.startswith("zeroshot_") for k in metrics)
    assert metrics["steps"] == cfg.pretrain.max_steps
    assert f"pretrain: zero-shot retrieval {note}" in capsys.readouterr().out
    (run,) = _stage_runs(tmp_path)
    assert run.data.tags["vlp.zero_shot"] == note
    n_pairs = len(read_pairs(karpathy_like, ["train", "restval"]))
    assert run.data.params["n_pairs"] == str(n_pairs)


def test_pretrain_with_no_eval_split_skips_the_check(cfg: Config, tmp_path: Path) -> None:
    pretrain(_on(cfg, Path(cfg.data.root), eval_split=None))
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["zero_shot"] == "skipped: pretrain.eval_split is null"


def test_pretrain_refuses_splits_the_dataset_lacks_before_training(
    cfg: Config, karpathy_like: Path, tmp_path: Path
) -> None:
    from vlp.errors import ConfigError, DataError

    has = r"its pairs.parquet has restval: 120 rows, train: 240 rows, val: 40 rows"
    for key, params in (
        ("pretrain.splits", {"tokenizer_splits": ["train"]}),
        ("pretrain.tokenizer_splits", {"splits": ["train"], "tokenizer_splits": ["pretrain"]}),
    ):
        with pytest.raises(
            DataError,
            match=rf"{key}: {karpathy_like}: no caption pairs in split\(s\) pretrain; {has}",
        ):
            pretrain(_on(cfg, karpathy_like, **params))
    with pytest.raises(ConfigError, match=r"pretrain.splits: unknown split 'restvall'; splits are"):
        pretrain(_on(cfg, karpathy_like, splits=["train", "restvall"]))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run or training
    assert not (tmp_path / "models").exists()


def test_pretrain_refuses_a_batch_that_cannot_fill_one_step_before_training(
    cfg: Config, smoke_data: Path, tmp_path: Path
) -> None:
    from vlp.data.manifest import read_pairs
    from vlp.errors import ConfigError

    pairs = read_pairs(smoke_data, "pretrain")
    n_images, n_pairs = pairs["image_id"].nunique(), len(pairs)
    assert n_images < 64 < n_pairs
    with pytest.raises(
        ConfigError,
        match=rf"pretrain.batch_size \* grad_accum_steps = 64 is more than the {n_images} "
        r"images of pretrain.splits \(pretrain\) the caption warm-up trains on .*"
        r"pretrain.caption_warmup_steps: 0",
    ):
        pretrain(_on(cfg, smoke_data, batch_size=64))
    # the joint phase: every caption is an item, incomplete batches are dropped
    with pytest.raises(
        ConfigError,
        match=rf"= {2 * n_pairs} is more than the {n_pairs} pairs of pretrain.splits \(pretrain\)",
    ):
        pretrain(_on(cfg, smoke_data, batch_size=n_pairs, grad_accum_steps=2))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run or training
    assert not (tmp_path / "models").exists()
