"""The pretrain-vision stage (MAE) on the smoke profile: checkpoint, pictures, run, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.stage_helpers import isolated_cfg
from vlp.config import Config
from vlp.errors import ConfigError, ResumeError
from vlp.pretrain_vision import pretrain_vision, work_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def _replace(cfg: Config, **pv: object) -> Config:
    return dataclasses.replace(cfg, pretrain_vision=dataclasses.replace(cfg.pretrain_vision, **pv))


@pytest.fixture
def cfg(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    cfg = isolated_cfg(smoke_cfg, tmp_path, monkeypatch)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_tower="vit"))
    return _replace(cfg, enabled=True, out_dir=str(tmp_path / "models" / "pretrained_vision"))


def _stage_runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain-vision"]


def _images(data: Path, n: int) -> list[Image.Image]:
    from vlp.data.manifest import read_pairs

    paths = read_pairs(data, "train")["image_path"].unique()[:n]
    return [Image.open(data / p).convert("RGB") for p in paths]


@pytest.mark.slow
def test_trains_a_vitmae_checkpoint_with_its_processor_pictures_and_run(
    cfg: Config, smoke_data: Path, tmp_path: Path
) -> None:
    import mlflow
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    from vlp.data.images import ImageTransform
    from vlp.data.processors import ProcessorTransform
    from vlp.models.mae import build_mae

    pv, size = cfg.pretrain_vision, cfg.data.image_size
    out = pretrain_vision(cfg)
    model = ViTMAEForPreTraining.from_pretrained(out)
    assert model.config.image_size == size and model.config.hidden_size == cfg.model.hidden_size
    assert model.config.num_hidden_layers == cfg.model.num_image_layers
    assert model.config.decoder_hidden_size == pv.decoder_hidden_size
    assert model.config.mask_ratio == pv.mask_ratio and model.config.norm_pix_loss
    torch.manual_seed(cfg.seed)
    start = build_mae(cfg.model, pv, size).state_dict()
    trained = model.state_dict()
    assert not torch.equal(
        start["vit.layers.0.mlp.fc1.weight"], trained["vit.layers.0.mlp.fc1.weight"]
    )
    assert type(AutoImageProcessor.from_pretrained(out)).__name__.startswith("ViTImageProcessor")
    # the saved processor preprocesses exactly as the evaluation transform
    im = cfg.images
    images = _images(smoke_data, 3)
    expected = ImageTransform(size, im.resize, tuple(im.mean), tuple(im.std)).pixels(images)
    assert torch.equal(ProcessorTransform.load(out, "out").pixels(images), expected)

    grid = Image.open(tmp_path / "plots" / "pretrain_vision_reconstructions.png")
    assert grid.size == (3 * size, pv.num_reconstructions * size)
    rows = list(csv.DictReader((tmp_path / "plots" / "pretrain_vision_loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, pv.max_steps + 1))
    assert all(float(r["loss"]) > 0 for r in rows)
    metrics = json.loads((tmp_path / "metrics" / "pretrain_vision.json").read_text())
    assert metrics["steps"] == pv.max_steps and metrics["loss_final"] == float(rows[-1]["loss"])
    assert metrics["train_images_per_s"] > 0 and metrics["n_images"] == 72  # pretrain + train

    (run,) = _stage_runs(tmp_path)
    assert run.info.run_name == "pretrain-vision" and run.info.status == "FINISHED"
    assert run.data.params["pretrain_vision.mask_ratio"] == str(pv.mask_ratio)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, pv.max_steps + 1))
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")}
    every = pv.checkpoint_every
    steps = range(every, pv.max_steps + 1, every)
    assert grids == {f"reconstructions/step-{s:08d}.png" for s in steps}
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pretrain_vision_reconstructions.png", "pretrain_vision_loss.csv"} <= top


@pytest.mark.slow
def test_resume_after_an_interruption_matches_the_uninterrupted_run(
    cfg: Config, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from vlp.train.checkpoint import list_checkpoints

    out = pretrain_vision(cfg)
    full = load_file(out / "model.safetensors")
    grid = (tmp_path / "plots" / "pretrain_vision_reconstructions.png").read_bytes()
    ckpts = list_checkpoints(work_dir(cfg) / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    # interrupted between steps 2 and 4: no step-4 checkpoint, no model
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out)
    with pytest.raises(ResumeError, match="pretrain_vision.mask_ratio"):
        pretrain_vision(_replace(cfg, mask_ratio=0.5), resume=True)
    pretrain_vision(cfg, resume=True)
    resumed = load_file(out / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert (tmp_path / "plots" / "pretrain_vision_reconstructions.png").read_bytes() == grid
    rows = (tmp_path / "plots" / "pretrain_vision_loss.csv").read_text().splitlines()
    assert len(rows) == 1 + cfg.pretrain_vision.max_steps  # steps 1-2 from the checkpoint
    killed, resumed_run = sorted(_stage_runs(tmp_path), key=lambda r: r.info.start_time)
    assert resumed_run.data.tags["vlp.resumed_from_run_id"] == killed.info.run_id


def test_disabled_writes_only_a_marker_and_trains_nothing(cfg: Config, tmp_path: Path) -> None:
    from vlp.io import OUTPUT_MARKER

    out = pretrain_vision(_replace(cfg, enabled=False))
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "disabled.json"])
    assert json.loads((out / "disabled.json").read_text()) == {"enabled": False}
    metrics = json.loads((tmp_path / "metrics" / "pretrain_vision.json").read_text())
    assert metrics == {"enabled": False, "steps": 0}
    assert (tmp_path / "plots" / "pretrain_vision_loss.csv").read_text() == "step,loss,lr\n"
    assert not work_dir(cfg).exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"splits": ["train", "test"]}, "evaluate.split"),
        ({"splits": ["pretrain", "val"], "pretrain_eval_split": "val"}, "pretrain.eval_split"),
        ({"mask_ratio": 1.0}, "pretrain_vision.mask_ratio"),
        ({"mask_ratio": 0.99}, "pretrain_vision.mask_ratio"),  # keeps no patch of 16
        ({"decoder_num_heads": 3}, "pretrain_vision.decoder_hidden_size"),
        ({"num_reconstructions": 0}, "pretrain_vision.num_reconstructions"),
        ({"batch_size": 128}, "pretrain_vision.batch_size"),
        ({"batch_size": 0}, "pretrain_vision.batch_size"),
        ({"splits": ["bogus"]}, "pretrain_vision.splits"),
    ],
)
def test_bad_params_are_refused_before_anything_is_written(
    cfg: Config, tmp_path: Path, change: dict, named: str
) -> None:
    change = dict(change)
    if eval_split := change.pop("pretrain_eval_split", None):
        cfg = dataclasses.replace(
            cfg, pretrain=dataclasses.replace(cfg.pretrain, eval_split=eval_split)
        )
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        pretrain_vision(_replace(cfg, **change))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _tiny_mae(path: Path, image_size: int, processor_size: int, seed: int = 0) -> Path:
    """A random ViTMAE checkpoint (other sizes than the smoke model) with an image processor."""
    from transformers import ViTImageProcessorPil, ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(seed)
    config = ViTMAEConfig(
        image_size=image_size, patch_size=8, hidden_size=24, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=48, decoder_hidden_size=16,
        decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )  # fmt: skip
    ViTMAEForPreTraining(config).save_pretrained(path)
    size = {"height": processor_size, "width": processor_size}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ViTImageProcessorPil(size=size, image_mean=mean, image_std=std).save_pretrained(path)
    return path


@pytest.mark.slow
def test_continues_a_vitmae_checkpoint_from_its_weights(cfg: Config, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    from vlp.models.mae import GRID_TABLES

    # trained at 16 px, its processor makes 32 px images: the stage trains at 32 px
    init = _tiny_mae(tmp_path / "init", image_size=16, processor_size=32)
    # one step at the warmup's learning rate of 0 leaves every weight where it started
    cfg = _replace(cfg, init_from=str(init), max_steps=1, warmup_steps=1, checkpoint_every=1)
    out = pretrain_vision(cfg)
    start = ViTMAEForPreTraining.from_pretrained(init).state_dict()
    model = ViTMAEForPreTraining.from_pretrained(out)
    assert model.config.hidden_size == 24 and model.config.image_size == 32
    assert model.config.decoder_hidden_size == 16  # the checkpoint's, not pretrain_vision's
    trained = model.state_dict()
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[k], trained[k]) for k in start if k not in GRID_TABLES)
    torch.manual_seed(1)
    fresh = ViTMAEForPreTraining(model.config).state_dict()  # the sin-cos tables of 32 px
    assert all(torch.equal(fresh[k], trained[k]) for k in GRID_TABLES)
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    assert processor.size == {"height": 32, "width": 32}
    from vlp.tasks import model_sha256

    (run,) = _stage_runs(tmp_path)
    assert run.data.tags["vlp.input.pretrain_vision.init_from"] == model_sha256(init)


def test_an_image_tower_other_than_vit_is_refused(cfg: Config, tmp_path: Path) -> None:
    cnn = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_tower="cnn"))
    with pytest.raises(ConfigError, match="model.image_tower is 'cnn'"):
        pretrain_vision(cnn)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_vitmae_checkpoint_is_refused(
    cfg: Config, tmp_path: Path
) -> None:
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_attention_heads=2).save_pretrained(vit)
    with pytest.raises(ConfigError, match=f"pretrain_vision.init_from: {vit} is a 'vit'"):
        pretrain_vision(_replace(cfg, init_from=str(vit)))
    with pytest.raises(ConfigError, match="pretrain_vision.init_from: .* not a local directory"):
        pretrain_vision(_replace(cfg, init_from=str(tmp_path / "missing")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_cli_error_is_one_line(
    cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlp.cli import main

    argv = ["--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke"]
    argv += ["--set", "pretrain_vision.enabled=true", "--set", "model.image_tower=vit"]
    argv += ["--set", "pretrain_vision.splits=[train, test]", "pretrain-vision"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("vlp pretrain-vision: error: pretrain_vision.splits: 'test'")
    assert "evaluate.split" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
