"""The generic training loop on a tiny real torch model: resume, accumulation, clipping, schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.train.settings import train_settings
from vlp.errors import ConfigError
from vlp.train import TrainSettings, train
from vlp.train.checkpoint import list_checkpoints
from vlp.train.loop import param_groups
from vlp.train.settings import cpu_has_native_bf16


class TinyRegressor(torch.nn.Module):
    """Two-layer MLP with dropout (so resume must restore the RNG) and a temperature."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16),
            torch.nn.LayerNorm(16),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(16, 1),
        )
        self.temp = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.net(x).squeeze(-1) * self.temp
        mse = torch.nn.functional.mse_loss(pred, y)
        l1 = (pred - y).abs().mean()
        return {"loss": mse + 0.1 * l1, "loss_mse": mse, "loss_l1": l1}


def make_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x @ torch.randn(6, generator=g) + 0.1 * torch.randn(n, generator=g))


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    xs, ys = zip(*items, strict=True)
    return {"x": torch.stack(xs), "y": torch.stack(ys)}


def fresh_model(dropout: float = 0.0) -> TinyRegressor:
    torch.manual_seed(0)
    return TinyRegressor(dropout)


def settings(**kw: object) -> TrainSettings:
    # fp32: the equivalences below hold to float rounding, which bf16 would swamp
    base = dict(
        epochs=3,
        batch_size=8,
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        device="cpu",
        precision="fp32",
    )
    return train_settings(**{**base, **kw})


class Stop(RuntimeError):
    """Simulated kill."""


def stop_at(step_to_stop: int):
    def on_log(metrics: dict[str, float], step: int) -> None:
        if step == step_to_stop:
            raise Stop

    return on_log


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if atol == 0.0:
            assert torch.equal(pa, pb), name
        else:
            torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path: Path, accum: int) -> None:
    # 40 samples / (8 * accum) -> 5 or 2 steps per epoch; stop at 7 or 3 (mid-epoch for
    # accum=1), checkpoints every 3 / 1 steps, so the resume starts inside an epoch.
    cfg = settings(grad_accum_steps=accum, checkpoint_every=3 if accum == 1 else 1, max_steps=-1)
    data = make_data()
    full = fresh_model(dropout=0.2)
    ref = train(full, data, collate, cfg, tmp_path / "full")

    stopped = fresh_model(dropout=0.2)
    with pytest.raises(Stop):
        train(stopped, data, collate, cfg, tmp_path / "run", on_log=stop_at(7 if accum == 1 else 3))
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert last.name == ("step-00000006" if accum == 1 else "step-00000003")

    resumed = fresh_model(dropout=0.2)  # a new process would start from fresh weights
    res = train(resumed, data, collate, cfg, tmp_path / "run", resume=True)
    assert res.steps == ref.steps == (15 if accum == 1 else 6)
    assert_same_weights(full, resumed)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 2  # keeps the last two


def test_resume_refuses_changed_batch_size(tmp_path: Path) -> None:
    train(fresh_model(), make_data(), collate, settings(max_steps=2), tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        train(
            fresh_model(),
            make_data(),
            collate,
            settings(max_steps=2, batch_size=4),
            tmp_path,
            resume=True,
        )


def test_accumulation_matches_larger_batch(tmp_path: Path) -> None:
    a, b = fresh_model(), fresh_model()
    ra = train(a, make_data(), collate, settings(batch_size=8, grad_accum_steps=2), tmp_path / "a")
    rb = train(b, make_data(), collate, settings(batch_size=16), tmp_path / "b")
    assert ra.steps == rb.steps == 6  # 40 // 16 = 2 steps/epoch x 3 epochs
    assert_same_weights(a, b, atol=1e-6)
    assert ra.history[-1]["loss"] == pytest.approx(rb.history[-1]["loss"], abs=1e-6)


def test_gradient_clipping_limits_updates(tmp_path: Path) -> None:
    start = fresh_model().state_dict()

    def moved(model: torch.nn.Module) -> float:
        return sum((p - start[k]).abs().sum().item() for k, p in model.state_dict().items())

    free, clipped = fresh_model(), fresh_model()
    cfg = dict(max_steps=3, warmup_steps=0, weight_decay=0.0)
    train(free, make_data(), collate, settings(max_grad_norm=0.0, **cfg), tmp_path / "a")
    # With AdamW a tiny clip norm pushes gradients below eps, so steps shrink ~1000x.
    res = train(clipped, make_data(), collate, settings(max_grad_norm=1e-11, **cfg), tmp_path / "b")
    assert res.history[0]["grad_norm"] > 1e-3  # reported norm is the pre-clip norm
    assert moved(clipped) < 0.01 * moved(free)


def test_warmup_cosine_schedule_and_decay_groups(tmp_path: Path) -> None:
    model = fresh_model()
    lrs: list[float] = []
    res = train(
        model,
        make_data(),
        collate,
        settings(epochs=2, warmup_steps=3, lr=0.1),
        tmp_path,
        on_log=lambda m, step: lrs.append(m["lr"]),
    )
    total = res.steps
    assert total == 10 and lrs == [h["lr"] for h in res.history]
    assert lrs[:3] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3])  # linear warmup
    progress = [(i - 3) / (total - 3) for i in range(3, total)]
    assert lrs[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * p)) for p in progress])
    decayed, plain = param_groups(model, 0.1, 0.2)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["lr"] == plain["lr"] == 0.2
    assert {p.ndim for p in decayed["params"]} == {2}
    assert any(p is model.temp for p in plain["params"])


def test_lr_multipliers_give_a_module_its_own_rate(tmp_path: Path) -> None:
    model = fresh_model()
    model.lr_multipliers = {"net.0.": 10.0}
    groups = param_groups(model, 0.1, 0.2)
    fast = [g for g in groups if g["lr"] == pytest.approx(2.0)]
    assert {id(p) for g in fast for p in g["params"]} == {
        id(model.net[0].weight),
        id(model.net[0].bias),
    }
    assert groups[0]["lr"] == 0.2  # the base group comes first: its lr is the one logged
    res = train(model, make_data(), collate, settings(epochs=1), tmp_path)
    assert res.steps > 0


def test_losses_fall_and_history_is_complete(tmp_path: Path) -> None:
    res = train(fresh_model(), make_data(), collate, settings(epochs=4), tmp_path)
    assert res.steps == 20 and [h["step"] for h in res.history] == list(range(1, 21))
    assert {"loss", "loss_mse", "loss_l1", "lr", "samples_per_s", "grad_norm"} <= set(
        res.history[0]
    )
    assert res.final["loss"] < 0.5 * res.history[0]["loss"]
    assert res.checkpoint is not None and res.checkpoint.name == "step-00000020"


def test_bf16_autocast_runs_on_cpu(tmp_path: Path) -> None:
    res = train(
        fresh_model(), make_data(), collate, settings(precision="bf16", max_steps=3), tmp_path
    )
    assert res.precision == "bf16" and math.isfinite(res.final["loss"])
    auto = train(
        fresh_model(),
        make_data(),
        collate,
        settings(max_steps=1, precision="auto"),
        tmp_path / "auto",
    )
    assert auto.precision == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_bad_settings_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        train_settings(precision="fp8")
    with pytest.raises(ConfigError, match="larger than the dataset"):
        train(fresh_model(), make_data(10), collate, settings(batch_size=16), tmp_path)


@pytest.mark.slow  # inductor compiles the step (C++ codegen): tens of seconds
def test_compiled_steps_match_eager(tmp_path: Path) -> None:
    """runtime.compile: the same losses and weights as eager, to float reassociation."""
    from torch._dynamo.utils import counters

    eager, compiled = fresh_model(), fresh_model()
    a = train(eager, make_data(), collate, settings(), tmp_path / "eager")
    counters.clear()
    b = train(compiled, make_data(), collate, settings(compile=True), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # the step really ran compiled
    assert len(a.history) == len(b.history) == 15
    for ha, hb in zip(a.history, b.history, strict=True):
        assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-5, abs=1e-6)
    assert_same_weights(eager, compiled, atol=1e-5)
    # checkpoints hold the model's own names, not the compiled wrapper's
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())
