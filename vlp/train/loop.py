"""One training loop for every stage: pretraining and each finetuning task.

The model is anything whose `forward(**batch)` returns a dict with a scalar `loss` (what is
optimised) and any number of `loss_*` scalars (logged): the stage decides what is optimised
by what it passes, e.g. `VLPObjective(model, weights)` or `VQAModel`. The loop adds AdamW with linear
warmup + cosine decay, gradient accumulation and clipping, bf16 autocast, exact
checkpoint/resume, and data parallelism under `torchrun` (DDP; gloo on CPU, NCCL on CUDA).

Batch semantics: `batch_size` is the global micro-batch (summed over ranks; each rank gets
`batch_size / world_size`), and one optimizer step sees `batch_size * grad_accum_steps`
samples. Incomplete batches at the end of an epoch are dropped, so every step has the
same size (contrastive losses need full batches; it also makes runs comparable).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from tqdm.auto import tqdm

from vlp.errors import ConfigError
from vlp.io import claim_dir, remove_dir
from vlp.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlp.train.distributed import DistInfo, barrier, init_distributed

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
# Settings that must match for a resumed run to continue the interrupted one exactly.
_RESUME_KEYS = ("batch_size", "grad_accum_steps", "seed", "epochs", "max_steps", "world_size")


@dataclass
class TrainSettings:
    """Plain knobs of one training run; build from a params section with `from_config`."""

    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs (runs as many epochs as needed)
    batch_size: int = 32  # global micro-batch, split across ranks
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 0  # optimizer steps; <= 0: only the final checkpoint
    log_every: int = 10  # progress-bar / log-line refresh, in steps
    seed: int = 0
    num_workers: int = 0
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False  # recompute the towers' layers in the backward pass

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.device not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not one of {DEVICES}")
        for name in ("batch_size", "grad_accum_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.epochs < 1 and self.max_steps <= 0:
            raise ConfigError("epochs: must be >= 1 unless max_steps > 0")

    @classmethod
    def from_config(cls, *sections: Any, seed: int = 0, **overrides: Any) -> TrainSettings:
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

    `auto` is bf16 on CUDA devices and CPUs with native bf16 support, else fp32. Measured
    on a 2-core AVX512-BF16 CPU (benchmarks/bench_train.py): one training step of the
    default-size model takes ~0.6x the time of fp32 under bf16 autocast; the
    smoke-size model is 1.2x slower (its matmuls are too small for the casts to pay off),
    but that only costs tests a fraction of a second.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = precision == "bf16" or cpu_has_native_bf16()
    if precision == "bf16" and not supported:
        raise ConfigError("precision: 'bf16' requested but this GPU does not support it")
    return torch.bfloat16 if supported else None


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only, never biases, norms or a learned temperature.

    A model may set `lr_multipliers = {"name.prefix.": factor}` to train some parameters
    (e.g. a freshly initialised task head on a pretrained body) at `factor * lr`.
    """
    multipliers: dict[str, float] = dict(getattr(model, "lr_multipliers", {}) or {})
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and norm weights are 1-D, a temperature / logit scale is 0-D.
        skip = p.ndim < 2 or "temp" in name or "logit_scale" in name
        factor = next((f for pre, f in multipliers.items() if name.startswith(pre)), 1.0)
        groups.setdefault((float(factor), skip), []).append(p)
    # The first group is the base rate: the loop logs its lr.
    return [
        {"params": ps, "weight_decay": 0.0 if skip else weight_decay, "lr": lr * factor}
        for (factor, skip), ps in groups.items()
    ]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _EpochKeys(Sampler):
    """The dataset keys of the current epoch, refilled by the loop before each epoch."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


def _mean_across_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[k] for k in keys])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(keys, stacked.tolist(), strict=True))


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None,
    settings: TrainSettings,
    out_dir: Path,
    *,
    resume: bool = False,
    on_log: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `dataset`; checkpoints go to `out_dir/checkpoints/`.

    `on_log(metrics, step)` is called on rank 0 after every optimizer step with the
    rank-averaged `loss*` values, `lr` (the rate used for that step), `grad_norm` and
    `samples_per_s`. With `resume`, the newest checkpoint is loaded and the run continues
    exactly where it stopped (same sampler order, RNG states, optimizer and schedule).
    """
    s = settings
    info = init_distributed()
    world, rank = info.world_size, info.rank
    device = resolve_device(s.device, info)
    amp_dtype = resolve_precision(s.precision, device)
    steps_per_epoch = epoch_steps(len(dataset), s, world)
    micro_bs = s.batch_size // world
    accum = s.grad_accum_steps

    # One sampler for 1 or N processes: with N ranks, rank r takes every N-th index of the
    # same seeded permutation, so the union of the ranks' micro-batches is exactly the
    # single-process micro-batch.
    # A streamed dataset (`vlp.data.shards.ShardPairs`) splits itself by rank and worker and
    # is told each epoch and micro-batch size with `set_epoch` instead.
    streamed = isinstance(dataset, IterableDataset)
    sampler = None
    if not streamed:
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=s.seed, drop_last=True
        )
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size * grad_accum_steps = {s.batch_size * accum} is larger than the "
            f"dataset ({len(dataset)} samples)"
        )
    total_steps = s.max_steps if s.max_steps > 0 else s.epochs * steps_per_epoch

    was_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if device.type == "cpu":
        # Bitwise-reproducible resume on CPU; warn_only keeps ops without a deterministic
        # kernel usable instead of raising.
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(s.seed + rank)
    if s.gradient_checkpointing:
        from vlp.models.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay, s.lr), lr=s.lr)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, s.warmup_steps, total_steps)

    ckpt_dir = Path(out_dir) / "checkpoints"
    step, epoch, micro_done = 0, 0, 0  # micro_done: micro-batches consumed in this epoch
    history: list[dict[str, float]] = []
    if info.is_main and resume:
        claim_dir(ckpt_dir, "checkpoints")  # a foreign folder fails now, not at a checkpoint
    elif info.is_main:
        remove_dir(ckpt_dir)  # stale checkpoints of an older run
    found = list_checkpoints(ckpt_dir) if resume else []
    if found:
        state = load_checkpoint(found[-1], model)
        saved = state["settings"]
        now = {**dataclasses.asdict(s), "world_size": world}
        for key in _RESUME_KEYS:
            if saved.get(key) != now[key]:
                raise ConfigError(
                    f"{key}: checkpoint {found[-1]} was written with {saved.get(key)!r}, "
                    f"now {now[key]!r}; resume needs the same value (or start without --resume)"
                )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, micro_done = state["step"], state["epoch"], state["micro_in_epoch"]
        history = list(state["history"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

    net: torch.nn.Module = model
    if world > 1:
        # find_unused_parameters: a finetuning task (or an objective weighted 0) leaves
        # whole heads without gradients; the extra graph walk is cheap at these sizes.
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def checkpoint() -> Path | None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        path = None
        if info.is_main:
            state = {
                "step": step,
                "epoch": epoch,
                "micro_in_epoch": micro_done,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "history": history,
                "settings": {**dataclasses.asdict(s), "world_size": world},
            }
            path = save_checkpoint(ckpt_dir, step, model, state, keep=s.keep_checkpoints)
        barrier()
        return path

    # One DataLoader for the whole run, so workers persist across epochs; each epoch
    # refills its sampler. A dataset with per-epoch randomness (augmentation) says so with
    # `takes_epoch` and gets (index, epoch) keys: its draws then depend on neither the
    # workers nor a resume.
    keys = _EpochKeys()
    loader = DataLoader(
        dataset,
        batch_size=micro_bs,
        sampler=None if streamed else keys,
        collate_fn=collate_fn,
        num_workers=s.num_workers,
        persistent_workers=s.num_workers > 0,
        drop_last=True,
        pin_memory=device.type == "cuda",
        # Own generator: worker seeding must not draw from the global RNG, or a
        # resumed run's model RNG would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(s.seed),
    )
    takes_epoch = bool(getattr(dataset, "takes_epoch", False))

    show = info.is_main and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=step, disable=not show, unit="step", desc="train")
    net.train()
    last_ckpt: Path | None = None  # set on rank 0 only
    last_ckpt_step = -1  # the same on every rank: decides the collective final checkpoint
    t_run, samples_run = time.perf_counter(), 0
    try:
        while step < total_steps:
            if sampler is not None:
                sampler.set_epoch(epoch)
                # Skip what an interrupted run already consumed: same permutation, later start.
                indices = list(sampler)[micro_done * micro_bs : steps_per_epoch * accum * micro_bs]
                keys.items = [(i, epoch) for i in indices] if takes_epoch else indices
                batches = iter(loader)
            else:
                dataset.set_epoch(epoch, micro_bs)
                batches = iter(loader)
                for _ in range(micro_done):  # the same seeded stream: skip what was consumed
                    next(batches)
            epoch_done = False
            while not epoch_done and step < total_steps:
                t0 = time.perf_counter()
                sums: dict[str, torch.Tensor] = {}
                for micro in range(accum):
                    batch = _to_device(next(batches), device)
                    # DDP all-reduces gradients only on the last micro-batch of a step.
                    sync = world == 1 or micro == accum - 1
                    with nullcontext() if sync else net.no_sync():
                        with torch.autocast(
                            device.type, dtype=amp_dtype or torch.bfloat16, enabled=bool(amp_dtype)
                        ):
                            out = net(**batch)
                        (out["loss"] / accum).backward()
                    for k, v in out.items():
                        if k == "loss" or k.startswith("loss_"):
                            sums[k] = sums.get(k, 0) + v.detach().float() / accum
                if s.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in model.parameters() if p.grad is not None]
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                micro_done += accum
                epoch_done = micro_done >= steps_per_epoch * accum
                if epoch_done:  # store the position as "start of next epoch"
                    epoch, micro_done = epoch + 1, 0

                sums["grad_norm"] = grad_norm.detach().float()
                metrics = _mean_across_ranks(sums, world)
                dt = time.perf_counter() - t0
                samples_run += s.batch_size * accum
                metrics.update(lr=lr, samples_per_s=s.batch_size * accum / dt, epoch=epoch)
                history.append({"step": step, **metrics})
                bar.update(1)
                if step % max(s.log_every, 1) == 0 or step == total_steps:
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.0f}"
                    )
                    if info.is_main and not show:
                        print(
                            f"step {step}/{total_steps} loss {metrics['loss']:.4f} "
                            f"lr {lr:.2e} {metrics['samples_per_s']:.0f} samples/s",
                            file=sys.stderr,
                            flush=True,
                        )
                if s.checkpoint_every > 0 and step % s.checkpoint_every == 0:
                    last_ckpt, last_ckpt_step = checkpoint(), step
                if info.is_main and on_log is not None:
                    on_log(metrics, step)
        if last_ckpt_step != step:
            last_ckpt = checkpoint()
    finally:
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
    wall = time.perf_counter() - t_run
    final = {k: v for k, v in history[-1].items() if k == "loss" or k.startswith("loss_")}
    return TrainResult(
        steps=step,
        history=history,
        final=final,
        wall_s=wall,
        samples_per_s=samples_run / wall if wall > 0 else 0.0,
        checkpoint=last_ckpt,
        device=str(device),
        precision="bf16" if amp_dtype else "fp32",
        world_size=world,
    )
