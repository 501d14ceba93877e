"""An exponential moving average of a model's weights, which a run can end with.

torch's own `AveragedModel` with its EMA update (`get_ema_multi_avg_fn`): after each optimizer
step every parameter's average moves `1 - decay` of the way to the parameter; the first
update copies the weights. Buffers (BatchNorm statistics) are the live model's. The averaged
copy holds every parameter once more, frozen ones too (they never move, so their average is
themselves).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """The EMA of `model`'s parameters (`decay` in (0, 1)); `update` after each step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model`'s current parameters (the first call copies them)."""
        self.averaged.update_parameters(model)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite `model`'s parameters with their averages."""
        averages = list(self.averaged.module.parameters())
        for param, average in zip(model.parameters(), averages, strict=True):
            param.copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def weight_ema(model: torch.nn.Module, decay: float | None) -> WeightEMA | None:
    """A `WeightEMA` of `model`, or None when `decay` is None or 0 (off)."""
    return WeightEMA(model, decay) if decay else None
