"""The settings of a training run and what it ran as: batch, schedule, device and precision.

`TrainSettings` holds the knobs `vlp.train.loop.train` takes (built from params sections),
`TrainResult` what a run did; `resolve_device` and `resolve_precision` turn `auto` into
the device and autocast dtype of this machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlp.config import PRECISIONS
from vlp.errors import ConfigError
from vlp.train.distributed import DistInfo

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainSettings:
    """Plain knobs of one training run; build from a params section with `from_config`."""

    epochs: int
    max_steps: int  # > 0 overrides epochs (runs as many epochs as needed)
    batch_size: int  # global micro-batch, split across ranks
    grad_accum_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float  # <= 0 disables clipping
    precision: str  # auto | bf16 | fp16 | fp32
    device: str  # auto | cpu | cuda
    checkpoint_every: int  # optimizer steps; <= 0: only the final checkpoint
    log_every: int  # progress-bar / log-line refresh, in steps
    seed: int
    num_workers: int
    gradient_checkpointing: bool  # recompute the towers' layers in the backward pass
    compile: bool  # torch.compile the module the loop calls (forward and backward)
    keep_checkpoints: int = 2  # not a param: how many step checkpoints a run keeps
    # EMA of the weights (`vlp.train.ema`), which the trained model ends with; None or 0:
    # off (a finetuning param; pretraining has none)
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.device not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not one of {DEVICES}")
        for name in ("batch_size", "grad_accum_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1) (or null: off), got {self.ema_decay}")
        if self.epochs < 1 and self.max_steps <= 0:
            raise ConfigError("epochs: must be >= 1 unless max_steps > 0")

    @classmethod
    def from_config(cls, *sections: Any, seed: int, **overrides: Any) -> TrainSettings:
        """Take every field the params sections (RuntimeConfig, PretrainConfig, ...) share with us.

        A later section wins over an earlier one; `overrides` win over all.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for section in sections:
            values.update({k: v for k, v in dataclasses.asdict(section).items() if k in names})
        values.setdefault("seed", seed)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class PatchDropout:
    """FLIP's schedule: image towers drop `rate` of each image's patch tokens in training,
    except in the last `unmasked_steps` optimizer steps, which see every patch.

    The rate of a step depends on its number alone, so a resumed run masks as the
    uninterrupted one does.
    """

    rate: float
    unmasked_steps: int

    def rate_at(self, step: int, total_steps: int) -> float:
        """The rate of optimizer step `step` (0-based) of a run of `total_steps`."""
        return self.rate if step < total_steps - self.unmasked_steps else 0.0


@dataclass
class TrainResult:
    """What a run did: optimizer steps, per-step history and the last step's losses."""

    steps: int
    history: list[dict[str, float]]
    final: dict[str, float]
    wall_s: float
    samples_per_s: float
    checkpoint: Path | None
    device: str
    precision: str
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def epoch_steps(n_samples: int, settings: TrainSettings, world_size: int) -> int:
    """Optimizer steps `train` makes in one epoch over `n_samples` items on `world_size` ranks.

    Each rank takes `n_samples // world_size` items and drops its incomplete micro-batches,
    so this is 0 when `batch_size * grad_accum_steps` items do not fit.
    """
    if settings.batch_size % world_size:
        raise ConfigError(
            f"batch_size: {settings.batch_size} is not divisible by {world_size} processes"
        )
    micro_bs = settings.batch_size // world_size
    return n_samples // world_size // micro_bs // settings.grad_accum_steps


def resolve_device(device: str, info: DistInfo) -> torch.device:
    """`auto` picks CUDA when present; under DDP each rank takes its local GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), not emulated."""
    # torch exposes no public query; these private checks are what its own tests use.
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `fp16` is CUDA only (training scales the loss, `torch.amp.GradScaler`); `auto` is bf16 on CUDA devices and CPUs with native bf16 support, else fp32. Measured
    on a 2-core AVX512-BF16 CPU (benchmarks/bench_train.py): one training step of the
    default-size model takes ~0.6x the time of fp32 under bf16 autocast; the
    smoke-size model is 1.2x slower (its matmuls are too small for the casts to pay off),
    but that only costs tests a fraction of a second.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "precision: 'fp16' needs a CUDA device (autocast with a gradient scaler); "
                f"this run is on {device.type}: use bf16 or fp32"
            )
        return torch.float16
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = precision == "bf16" or cpu_has_native_bf16()
    if precision == "bf16" and not supported:
        raise ConfigError("precision: 'bf16' requested but this GPU does not support it")
    return torch.bfloat16 if supported else None


def resolve_inference_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a checkpoint measured or embedded untrained, or None for fp32.

    `auto` is fp32 on CPUs, where a checkpoint's own outputs (and the numbers published for
    it) are computed in fp32, and bf16 on CUDA devices that have it; `bf16` is a choice.
    """
    if precision == "auto" and device.type != "cuda":
        return None
    return resolve_precision(precision, device)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What a run's autocast dtype (`resolve_precision`) is called: bf16, fp16 or fp32."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
