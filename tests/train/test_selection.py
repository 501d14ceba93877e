"""Model selection in the training loop on a tiny real model: best weights kept, early stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.test_loop import collate, fresh_model, make_data, settings
from vlp.errors import ConfigError
from vlp.train import train
from vlp.train.selection import ModelSelection, SelectionSettings

PEAK = 3  # the step whose predictions are the held-out targets


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _held_out() -> torch.Tensor:
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(7))


def _trajectory(tmp_path: Path, steps: int) -> tuple[dict[int, dict], torch.Tensor]:
    """Every step's weights of a plain run, and its predictions on the held-out inputs at PEAK."""
    model, seen = fresh_model(), {}

    def record(step: int) -> bool:
        seen[step] = _weights(model)
        return False

    train(
        model, make_data(), collate, settings(max_steps=steps), tmp_path / "plain", on_step=record
    )
    peak = fresh_model()
    peak.load_state_dict(seen[PEAK])
    with torch.no_grad():
        return seen, peak.net(_held_out()).squeeze(-1) * peak.temp


def _selection(model: torch.nn.Module, targets: torch.Tensor, **kw: int) -> ModelSelection:
    """Selection by `neg_mse` on held-out data whose targets are the PEAK step's predictions:
    the score peaks (at 0) at step PEAK and nowhere else."""

    @torch.no_grad()
    def score(step: int) -> dict[str, float]:
        pred = model.net(_held_out()).squeeze(-1) * model.temp
        return {"neg_mse": -torch.nn.functional.mse_loss(pred, targets).item()}

    every, patience = kw.get("every", 1), kw.get("patience", 0)
    s = SelectionSettings(every=every, metric="neg_mse", patience=patience, maximise=True)
    return ModelSelection(s, model, score)


def test_selection_keeps_the_best_steps_weights_and_scores_the_last_step(tmp_path: Path) -> None:
    steps = 8
    seen, targets = _trajectory(tmp_path, steps)
    model = fresh_model()
    select = _selection(model, targets, every=3)
    result = train(
        model,
        make_data(),
        collate,
        settings(max_steps=steps),
        tmp_path / "sel",
        on_step=select.on_step,
    )
    assert result.steps == steps  # patience 0: never stops early
    for k, v in _weights(model).items():  # training ends on the last step's weights...
        torch.testing.assert_close(v, seen[steps][k], rtol=0, atol=0)
    best = select.finish(result.steps)
    assert [s.step for s in select.scorings] == [3, 6, 8]  # every 3 steps, then the last
    assert best is not None and best.step == PEAK and best.value == 0.0
    for k, v in _weights(model).items():  # ... and selection puts the best step's back
        torch.testing.assert_close(v, seen[PEAK][k], rtol=0, atol=0)
    assert not torch.equal(seen[PEAK]["net.0.weight"], seen[steps]["net.0.weight"])
    assert select.summary() == {
        "val_metric": "neg_mse",
        "val_best_step": PEAK,
        "val_best_value": 0.0,
        "val_scorings": 3,
        "stopped_early": False,
    }
    assert [r["best"] for r in select.curve()] == [1, 0, 0]


def test_a_rank_or_distance_is_minimised(tmp_path: Path) -> None:
    """The same held-out data scored by its MSE (lower is better) picks the same step."""
    seen, targets = _trajectory(tmp_path, 6)
    model = fresh_model()

    @torch.no_grad()
    def score(step: int) -> dict[str, float]:
        pred = model.net(_held_out()).squeeze(-1) * model.temp
        return {"mse": torch.nn.functional.mse_loss(pred, targets).item()}

    s = SelectionSettings(every=1, metric="mse", patience=0, maximise=False)
    select = ModelSelection(s, model, score)
    result = train(
        model, make_data(), collate, settings(max_steps=6), tmp_path / "sel", on_step=select.on_step
    )
    best = select.finish(result.steps)
    assert best is not None and best.step == PEAK and best.value == 0.0
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, seen[PEAK][k], rtol=0, atol=0)


def test_early_stopping_ends_the_run_after_patience_scorings_without_improvement(
    tmp_path: Path,
) -> None:
    seen, targets = _trajectory(tmp_path, 12)
    model = fresh_model()
    select = _selection(model, targets, patience=2)
    result = train(
        model,
        make_data(),
        collate,
        settings(max_steps=12),
        tmp_path / "sel",
        on_step=select.on_step,
    )
    assert result.steps == PEAK + 2 and select.stopped_early
    assert [h["step"] for h in result.history] == list(range(1, PEAK + 3))
    select.finish(result.steps)
    assert len(select.scorings) == PEAK + 2  # the stopping step was scored: not scored twice
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, seen[PEAK][k], rtol=0, atol=0)


def test_an_unknown_metric_and_bad_settings_are_named(tmp_path: Path) -> None:
    model = fresh_model()
    s = SelectionSettings(every=1, metric="rsum", patience=0, maximise=True)
    select = ModelSelection(s, model, lambda step: {"CIDEr": 1.0})
    with pytest.raises(ConfigError, match="val_metric: 'rsum' is not a metric.*CIDEr"):
        select.on_step(1)
    with pytest.raises(ConfigError, match="val_every"):
        SelectionSettings(every=0, metric="rsum", patience=0, maximise=True)
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        SelectionSettings(every=1, metric="rsum", patience=-1, maximise=True)


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from tests.train.test_ddp import DEADLOCK

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", timeout=DEADLOCK, rank=rank, world_size=2
    )
    try:
        model, scores = fresh_model(), iter([1.0, 3.0, 2.0, 2.5, 5.0])

        def score(step: int) -> dict[str, float]:
            assert rank == 0, "only rank 0 scores"
            return {"m": next(scores)}

        select = ModelSelection(
            SelectionSettings(every=1, metric="m", patience=2, maximise=True),
            model,
            score,
            rank == 0,
            2,
        )
        s = settings(max_steps=8, batch_size=8)
        result = train(
            model, make_data(), collate, s, Path(out) / str(rank), on_step=select.on_step
        )
        best = select.finish(result.steps)
        torch.save({"steps": result.steps, "best": best and best.step}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two training processes
def test_every_rank_stops_at_the_step_rank_0_decides(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    done = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    # best 3.0 at step 2, then 2.0 and 2.5: two scorings without improvement
    assert done == [{"steps": 4, "best": 2}, {"steps": 4, "best": None}]
