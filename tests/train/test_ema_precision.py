"""The loop's EMA of the weights and its fp16 path (a gradient scaler on CUDA, refused on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.train.test_loop import (
    Stop,
    assert_same_weights,
    collate,
    fresh_model,
    make_data,
    settings,
    stop_at,
)
from vlp.errors import ConfigError
from vlp.train import train
from vlp.train.checkpoint import list_checkpoints


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_ema_run_ends_with_the_average_of_the_trajectory(tmp_path: Path) -> None:
    decay = 0.7
    plain, trajectory = fresh_model(), []
    train(
        plain,
        make_data(),
        collate,
        settings(max_steps=5),
        tmp_path / "plain",
        on_log=lambda metrics, step: trajectory.append(_weights(plain)),
    )
    averaged = fresh_model()
    res = train(averaged, make_data(), collate, settings(max_steps=5, ema_decay=decay), tmp_path)
    assert res.steps == 5 and len(trajectory) == 5
    # the EMA of the weights after each step: the first step's weights, then lerp by 1 - decay
    expected = trajectory[0]
    for step in trajectory[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, step, strict=True)]
    for got, want, last in zip(averaged.parameters(), expected, trajectory[-1], strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)
        assert not torch.allclose(got.detach(), last)  # not the last step's raw weights


def test_ema_of_zero_or_null_changes_nothing(tmp_path: Path) -> None:
    a, b = fresh_model(), fresh_model()
    train(a, make_data(), collate, settings(max_steps=3), tmp_path / "a")
    train(b, make_data(), collate, settings(max_steps=3, ema_decay=0.0), tmp_path / "b")
    assert_same_weights(a, b)


def test_resume_restores_the_average(tmp_path: Path) -> None:
    s = settings(max_steps=6, checkpoint_every=2, ema_decay=0.8)
    ref = fresh_model()
    train(ref, make_data(), collate, s, tmp_path / "ref")
    stopped = fresh_model()
    with pytest.raises(Stop):
        train(stopped, make_data(), collate, s, tmp_path / "run", on_log=stop_at(5))
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step-00000004"
    resumed = fresh_model()
    train(resumed, make_data(), collate, s, tmp_path / "run", resume=True)
    assert_same_weights(ref, resumed)


def test_bad_ema_decay_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"ema_decay: must be in \[0, 1\)"):
        settings(ema_decay=1.0)


def test_fp16_is_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision: 'fp16' needs a CUDA device.*bf16 or fp32"):
        train(fresh_model(), make_data(), collate, settings(precision="fp16"), tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast trains on CUDA only")
def test_fp16_trains_with_a_gradient_scaler_on_cuda(tmp_path: Path) -> None:
    model = fresh_model()
    s = settings(precision="fp16", device="cuda", max_steps=8, checkpoint_every=4)
    res = train(model, make_data(), collate, s, tmp_path)
    assert res.precision == "fp16" and res.device.startswith("cuda")
    assert math.isfinite(res.final["loss"]) and res.history[-1]["loss"] < res.history[0]["loss"]
    state = torch.load(res.checkpoint / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state is checkpointed for resume
    fp32 = fresh_model()
    train(fp32, make_data(), collate, settings(device="cuda", max_steps=8), tmp_path / "fp32")
    for a, b in zip(model.parameters(), fp32.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)  # fp16 rounding, same training
