"""FLIP in the pretrain stage: the joint phase drops patches, its last steps see them all."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import vlp.pretrain
from tests.stage_helpers import isolated_cfg
from vlp.config import Config
from vlp.errors import ConfigError, ResumeError
from vlp.models.patch_dropout import kept_patches
from vlp.models.towers import ImageTower
from vlp.pretrain import pretrain
from vlp.pretrain_fingerprint import fingerprint, work_dir

PATCHES = (32 // 8) ** 2  # smoke images (data.image_size 32) in 8-pixel patches


def _flip(cfg: Config, **pretrain_params: Any) -> Config:
    """`cfg` with a ViT tower and `pretrain_params` applied."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, image_tower="vit"),
        pretrain=dataclasses.replace(cfg.pretrain, **pretrain_params),
    )


@pytest.fixture
def cfg(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    """The smoke profile with a ViT tower, FLIP on, every output under `tmp_path`."""
    base = isolated_cfg(smoke_cfg, tmp_path, monkeypatch)
    return _flip(
        base,
        out_dir=str(tmp_path / "models" / "pretrained"),
        patch_dropout=0.5,
        unmasked_steps=2,
    )


def _count_tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Image tokens of each training forward, per phase (its work folder's name)."""
    seen: dict[str, list[int]] = {}
    real_train = vlp.pretrain.train

    def train(model, dataset, collate, settings, out_dir, **kw):
        (tower,) = [m for m in model.modules() if isinstance(m, ImageTower)]
        counts = seen.setdefault(Path(out_dir).name, [])

        def record(module, args, out):
            if module.training:
                counts.append(out.shape[1])

        hook = tower.register_forward_hook(record)
        try:
            return real_train(model, dataset, collate, settings, out_dir, **kw)
        finally:
            hook.remove()
            assert tower.patch_dropout == 0.0  # the model leaves training unmasked

    monkeypatch.setattr(vlp.pretrain, "train", train)
    return seen


@pytest.mark.slow
def test_joint_phase_drops_patches_until_its_unmasked_steps(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    seen = _count_tokens(monkeypatch)
    pretrain(cfg)
    p = cfg.pretrain
    full, masked = 1 + PATCHES, 1 + kept_patches(PATCHES, 0.5)
    assert p.caption_warmup_steps == 2 and p.max_steps == 4  # the smoke profile's
    # one tower forward per step: the warm-up sees every patch, then FLIP, then unmasked
    assert seen == {"caption_warmup": [full] * 2, work_dir(cfg).name: [masked] * 2 + [full] * 2}
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["loss_first"] > 0 and metrics["loss_last"] > 0
    assert "zeroshot_t2i_R@1" in metrics
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.data.tags.get("vlp.stage") == "pretrain"]
    assert run.data.params["pretrain.patch_dropout"] == "0.5"
    assert run.data.params["pretrain.unmasked_steps"] == "2"


@pytest.mark.slow
def test_resume_across_the_switch_matches_uninterrupted(cfg: Config) -> None:
    """A kill after step 2 of 4, one unmasked step: the resumed run masks steps 3 as before."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from vlp.train.checkpoint import list_checkpoints

    cfg = _flip(cfg, unmasked_steps=1)
    out = pretrain(cfg)
    full = load_file(out / "model.safetensors")
    ckpts = list_checkpoints(work_dir(cfg) / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out)
    pretrain(cfg, resume=True)
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # and the masks matter: the same run without patch dropout learns other weights
    shutil.rmtree(out)
    plain = load_file(pretrain(_flip(cfg, patch_dropout=0.0)) / "model.safetensors")
    assert not all(torch.equal(full[k], plain[k]) for k in full)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"patch_dropout": 1.0}, r"pretrain.patch_dropout: must be in \[0, 1\), got 1.0"),
        ({"patch_dropout": -0.1}, r"pretrain.patch_dropout: must be in \[0, 1\)"),
        ({"unmasked_steps": -1}, r"pretrain.unmasked_steps: must be >= 0, got -1"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(
    cfg: Config, tmp_path: Path, over: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        pretrain(_flip(cfg, **over))
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("tower", ["cnn", "convnext"])
def test_towers_without_patches_are_refused(cfg: Config, tmp_path: Path, tower: str) -> None:
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_tower=tower))
    with pytest.raises(ConfigError, match=f"model.image_tower '{tower}' has no patch tokens"):
        pretrain(bad)
    assert not (tmp_path / "models").exists()
    # without patch dropout they train as before: unmasked_steps alone is harmless
    fingerprint(_flip(bad, patch_dropout=0.0))


def test_fingerprint_holds_both_keys(cfg: Config) -> None:
    params = fingerprint(cfg)["params"]
    assert params["pretrain.patch_dropout"] == 0.5 and params["pretrain.unmasked_steps"] == 2
    assert fingerprint(_flip(cfg, patch_dropout=0.75))["params"] != params
    assert fingerprint(_flip(cfg, unmasked_steps=1))["params"] != params


@pytest.mark.slow
def test_resume_with_another_rate_is_refused(cfg: Config) -> None:
    pretrain(cfg)
    with pytest.raises(ResumeError, match="pretrain.patch_dropout"):
        pretrain(_flip(cfg, patch_dropout=0.75), resume=True)
