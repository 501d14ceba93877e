"""Model selection during training: score held-out data every N optimizer steps, keep the best
weights, stop early when the score stops improving.

`ModelSelection.on_step` is the `on_step` hook of `vlp.train.loop.train`: every
`every` optimizer steps rank 0 calls `score(step)` (the stage's own evaluation, returning
its metrics) and remembers a CPU copy of the module's weights whenever `metric` beats the
best value so far (strictly: a tie keeps the earlier step). With `patience` > 0 the run
stops after that many scorings in a row without improvement; under `torchrun` rank 0
broadcasts the decision so that every rank stops at the same step. `finish` scores the last
step if it was not scored yet and loads the best weights back into the module.

The metric is maximised (every task's primary metric: R@K sum, CIDEr, VQA accuracy,
compositional exact match) or, with `maximise` false, minimised (a median rank, a Fréchet
distance). The best weights are held in memory (one CPU copy of the state dict), never
written as a checkpoint of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vlp.errors import ConfigError


@dataclass(frozen=True)
class SelectionSettings:
    """When to score (`every` optimizer steps), by which metric (`maximise` it, or minimise
    it: a rank or a distance), and the early-stopping `patience` (scorings without
    improvement; 0: never stop early)."""

    every: int
    metric: str
    patience: int
    maximise: bool

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"val_every: must be >= 1 to select a model, got {self.every}")
        if self.patience < 0:
            raise ConfigError(f"early_stopping_patience: must be >= 0, got {self.patience}")


@dataclass
class Scoring:
    """One scoring: the step, its metrics, and whether it was the best so far."""

    step: int
    metrics: dict[str, float]
    value: float
    best: bool


@dataclass
class ModelSelection:
    """The running selection of one training run (see the module docstring).

    `score(step)` runs on rank 0 alone and returns the metrics of the module as it stands;
    `on_score(scoring)` (rank 0) is told each result, e.g. to log it.
    """

    settings: SelectionSettings
    module: torch.nn.Module
    score: Callable[[int], dict[str, float]]
    is_main: bool = True
    world_size: int = 1
    on_score: Callable[[Scoring], None] | None = None
    scorings: list[Scoring] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    _since_best: int = 0

    @property
    def best(self) -> Scoring | None:
        """The best scoring so far (None before the first)."""
        return next((s for s in reversed(self.scorings) if s.best), None)

    def _score_now(self, step: int) -> None:
        metrics = self.score(step)
        name = self.settings.metric
        if name not in metrics:
            known = ", ".join(sorted(metrics))
            raise ConfigError(f"val_metric: {name!r} is not a metric of this task; it has {known}")
        value = float(metrics[name])
        best = self.best
        better = best is None or (
            value > best.value if self.settings.maximise else value < best.value
        )
        improved = not math.isnan(value) and better
        if improved:
            state = self.module.state_dict()
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            self._since_best = 0
        else:
            self._since_best += 1
        scoring = Scoring(step, dict(metrics), value, improved)
        self.scorings.append(scoring)
        if self.on_score is not None:
            self.on_score(scoring)

    def on_step(self, step: int) -> bool:
        """The loop's hook after optimizer step `step` (every rank): score when due; whether
        to stop now."""
        if step % self.settings.every:
            return False
        stop = False
        if self.is_main:
            self._score_now(step)
            stop = 0 < self.settings.patience <= self._since_best
        if self.world_size > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        self.stopped_early = stop
        return stop

    def finish(self, step: int) -> Scoring | None:
        """Score the final `step` if it was not scored, load the best weights into the module
        (rank 0) and return the best scoring (None on other ranks)."""
        if not self.is_main:
            return None
        if not self.scorings or self.scorings[-1].step != step:
            self._score_now(step)
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        return self.best

    def summary(self) -> dict[str, Any]:
        """What the selection chose, for the model's `task.json` and the run's metrics."""
        best = self.best
        return {
            "val_metric": self.settings.metric,
            "val_best_step": None if best is None else best.step,
            "val_best_value": None if best is None else best.value,
            "val_scorings": len(self.scorings),
            "stopped_early": self.stopped_early,
        }

    def curve(self) -> list[dict[str, Any]]:
        """The val curve: one row per scoring (`CURVE_COLUMNS`)."""
        return [
            {"step": s.step, "metric": self.settings.metric, "score": s.value, "best": int(s.best)}
            for s in self.scorings
        ]


CURVE_COLUMNS = ("step", "metric", "score", "best")
