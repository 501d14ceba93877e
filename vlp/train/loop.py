"""One training loop for every stage: pretraining and each finetuning task.

The model is anything whose `forward(**batch)` returns a dict with a scalar `loss` (what is
optimised) and any number of `loss_*` scalars (logged): the stage decides what is optimised
by what it passes, e.g. `VLPObjective(model, weights)` or `VQAModel`. The loop adds AdamW with linear
warmup + cosine decay, gradient accumulation and clipping, bf16 autocast (fp16 with a
gradient scaler on CUDA), an optional EMA of the weights that the model ends with
(`vlp.train.ema`), exact checkpoint/resume, and data parallelism under `torchrun` (DDP; gloo
on CPU, NCCL on CUDA).
It is one module past 450 lines because the loop's steps (set-up, step, checkpoint, resume)
share its private state; split, each would import the others' internals.

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
from vlp.models.patch_dropout import set_patch_dropout
from vlp.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlp.train.distributed import DistInfo, barrier, init_distributed
from vlp.train.ema import WeightEMA, weight_ema
from vlp.train.settings import (
    PatchDropout,
    TrainResult,
    TrainSettings,
    epoch_steps,
    precision_name,
    resolve_device,
    resolve_precision,
)

# Settings that must match for a resumed run to continue the interrupted one exactly.
_RESUME_KEYS = ("batch_size", "grad_accum_steps", "seed", "epochs", "max_steps", "world_size")


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


@dataclass
class _Position:
    """Where a run stands: optimizer steps, epoch, micro-batches consumed in it, history."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Run:
    """Everything one `train` call holds while it runs."""

    settings: TrainSettings
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ckpt_dir: Path
    pos: _Position
    scaler: torch.amp.GradScaler  # scales fp16 losses; a pass-through otherwise
    ema: WeightEMA | None

    @property
    def world(self) -> int:
        return self.info.world_size


def _epoch_sampler(dataset: Dataset, s: TrainSettings, info: DistInfo) -> Sampler | None:
    """The sampler of a map-style dataset (None for a streamed one).

    One sampler for 1 or N processes: with N ranks, rank r takes every N-th index of the
    same seeded permutation, so the union of the ranks' micro-batches is exactly the
    single-process micro-batch. A streamed dataset (`vlp.data.shard_stream.ShardPairs`) splits
    itself by rank and worker and is told each epoch and micro-batch size with `set_epoch`.
    """
    if isinstance(dataset, IterableDataset):
        return None
    return DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=s.seed,
        drop_last=True,
    )


def _total_steps(dataset: Dataset, s: TrainSettings, steps_per_epoch: int) -> int:
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size * grad_accum_steps = {s.batch_size * s.grad_accum_steps} is larger "
            f"than the dataset ({len(dataset)} samples)"
        )
    return s.max_steps if s.max_steps > 0 else s.epochs * steps_per_epoch


def _restore(run: _Run, resume: bool) -> None:
    """Clear stale checkpoints, or load the newest one into `run` when resuming."""
    s, info = run.settings, run.info
    if info.is_main and resume:
        claim_dir(run.ckpt_dir, "checkpoints")  # a foreign folder fails now, not at a checkpoint
    elif info.is_main:
        remove_dir(run.ckpt_dir)  # stale checkpoints of an older run
    found = list_checkpoints(run.ckpt_dir) if resume else []
    if not found:
        return
    state = load_checkpoint(found[-1], run.model)
    saved = state["settings"]
    now = {**dataclasses.asdict(s), "world_size": run.world}
    for key in _RESUME_KEYS:
        if saved.get(key) != now[key]:
            raise ConfigError(
                f"{key}: checkpoint {found[-1]} was written with {saved.get(key)!r}, "
                f"now {now[key]!r}; resume needs the same value (or start without --resume)"
            )
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.pos = _Position(
        state["step"], state["epoch"], state["micro_in_epoch"], list(state["history"])
    )
    rngs = state["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])


def _checkpoint(run: _Run) -> Path | None:
    """Save the run's exact state on rank 0 (RNG states of every rank); all ranks wait."""
    rngs = [rng_state()]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state())
    path = None
    if run.info.is_main:
        pos = run.pos
        state = {
            "step": pos.step,
            "epoch": pos.epoch,
            "micro_in_epoch": pos.micro_done,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rngs,
            "history": pos.history,
            "settings": {**dataclasses.asdict(run.settings), "world_size": run.world},
            "scaler": run.scaler.state_dict(),
            **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        }
        path = save_checkpoint(
            run.ckpt_dir, pos.step, run.model, state, keep=run.settings.keep_checkpoints
        )
    barrier()
    return path


def _wrap_ddp(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    # find_unused_parameters: a finetuning task (or an objective weighted 0) leaves
    # whole heads without gradients; the extra graph walk is cheap at these sizes.
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def _loader(
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None,
    run: _Run,
    keys: _EpochKeys,
) -> DataLoader:
    """One DataLoader for the whole run, so workers persist across epochs.

    Each epoch refills its sampler `keys`. A dataset with per-epoch randomness
    (augmentation) says so with `takes_epoch` and gets (index, epoch) keys: its draws then
    depend on neither the workers nor a resume.
    """
    s = run.settings
    return DataLoader(
        dataset,
        batch_size=s.batch_size // run.world,
        sampler=None if isinstance(dataset, IterableDataset) else keys,
        collate_fn=collate_fn,
        num_workers=s.num_workers,
        persistent_workers=s.num_workers > 0,
        drop_last=True,
        pin_memory=run.device.type == "cuda",
        # Own generator: worker seeding must not draw from the global RNG, or a
        # resumed run's model RNG would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(s.seed),
    )


def _epoch_batches(
    run: _Run, dataset: Dataset, sampler: Sampler | None, keys: _EpochKeys, loader: DataLoader
) -> Iterator[Any]:
    """The micro-batches left in the current epoch (skipping what a resumed run consumed)."""
    pos, micro_bs = run.pos, run.settings.batch_size // run.world
    if sampler is not None:
        sampler.set_epoch(pos.epoch)
        # Skip what an interrupted run already consumed: same permutation, later start.
        end = run.steps_per_epoch * run.settings.grad_accum_steps * micro_bs
        indices = list(sampler)[pos.micro_done * micro_bs : end]
        takes_epoch = bool(getattr(dataset, "takes_epoch", False))
        keys.items = [(i, pos.epoch) for i in indices] if takes_epoch else indices
        return iter(loader)
    dataset.set_epoch(pos.epoch, micro_bs)
    batches = iter(loader)
    for _ in range(pos.micro_done):  # the same seeded stream: skip what was consumed
        next(batches)
    return batches


def _accumulate(run: _Run, batches: Iterator[Any]) -> dict[str, torch.Tensor]:
    """Forward and backward over one step's micro-batches; the mean of their `loss*` values."""
    accum, amp_dtype = run.settings.grad_accum_steps, run.amp_dtype
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = _to_device(next(batches), run.device)
        # DDP all-reduces gradients only on the last micro-batch of a step.
        sync = run.world == 1 or micro == accum - 1
        with nullcontext() if sync else run.net.no_sync():
            with torch.autocast(
                run.device.type, dtype=amp_dtype or torch.bfloat16, enabled=bool(amp_dtype)
            ):
                out = run.net(**batch)
            run.scaler.scale(out["loss"] / accum).backward()
        for k, v in out.items():
            if k == "loss" or k.startswith("loss_"):
                sums[k] = sums.get(k, 0) + v.detach().float() / accum
    return sums


def _optimizer_step(run: _Run, sums: dict[str, torch.Tensor], t0: float) -> dict[str, float]:
    """Clip, step and advance the position; the step's rank-averaged metrics."""
    s, model, pos = run.settings, run.model, run.pos
    run.scaler.unscale_(run.optimizer)  # clip and report the true gradients
    if s.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]
        )
    lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)  # skipped where fp16 gradients overflowed
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(model)
    pos.step += 1
    pos.micro_done += s.grad_accum_steps
    if pos.micro_done >= run.steps_per_epoch * s.grad_accum_steps:
        # store the position as "start of next epoch"
        pos.epoch, pos.micro_done = pos.epoch + 1, 0
    sums["grad_norm"] = grad_norm.detach().float()
    metrics = _mean_across_ranks(sums, run.world)
    samples = s.batch_size * s.grad_accum_steps
    metrics.update(lr=lr, samples_per_s=samples / (time.perf_counter() - t0), epoch=pos.epoch)
    pos.history.append({"step": pos.step, **metrics})
    return metrics


def _show_progress(run: _Run, bar: tqdm, metrics: dict[str, float], show: bool) -> None:
    step, total = run.pos.step, run.total_steps
    bar.update(1)
    if step % max(run.settings.log_every, 1) and step != total:
        return
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.0f}")
    if run.info.is_main and not show:
        print(
            f"step {step}/{total} loss {metrics['loss']:.4f} "
            f"lr {metrics['lr']:.2e} {metrics['samples_per_s']:.0f} samples/s",
            file=sys.stderr,
            flush=True,
        )


def _start(
    model: torch.nn.Module,
    dataset: Dataset,
    s: TrainSettings,
    info: DistInfo,
    out_dir: Path,
    resume: bool,
) -> _Run:
    """Seed, place the model, build optimizer and schedule, and restore a resumed run."""
    device = resolve_device(s.device, info)
    amp_dtype = resolve_precision(s.precision, device)
    steps_per_epoch = epoch_steps(len(dataset), s, info.world_size)
    total_steps = _total_steps(dataset, s, steps_per_epoch)
    if device.type == "cpu":
        # Bitwise-reproducible resume on CPU; warn_only keeps ops without a deterministic
        # kernel usable instead of raising.
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(s.seed + info.rank)
    if s.gradient_checkpointing:
        from vlp.models.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay, s.lr), lr=s.lr)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, s.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = _Run(
        s, info, device, amp_dtype, steps_per_epoch, total_steps, model, model,
        optimizer, scheduler, Path(out_dir) / "checkpoints", _Position(), scaler,
        weight_ema(model, s.ema_decay),
    )  # fmt: skip
    _restore(run, resume)
    run.net = _wrap_ddp(model, device, info.world_size)
    if s.compile:
        # the loop calls `net`; parameters, optimizer and checkpoints stay on `model`
        run.net = torch.compile(run.net)
    return run


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None,
    settings: TrainSettings,
    out_dir: Path,
    *,
    resume: bool = False,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    masking: PatchDropout | None = None,
    on_step: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train `model` in place on `dataset`; checkpoints go to `out_dir/checkpoints/`.

    `on_log(metrics, step)` is called on rank 0 after every optimizer step with the
    rank-averaged `loss*` values, `lr` (the rate used for that step), `grad_norm` and
    `samples_per_s`. With `resume`, the newest checkpoint is loaded and the run continues
    exactly where it stopped (same sampler order, RNG states, optimizer and schedule).
    `masking` sets the image towers' patch dropout before each step (FLIP); the towers are
    left at 0 when the run ends. `on_step(step)` is called on every rank after each optimizer
    step (after `on_log`, e.g. to score held-out data: `vlp.train.selection`); when it returns
    True (the same on every rank) the run ends after that step. With `settings.ema_decay` the
    model ends with the EMA of its weights (its checkpoints hold the raw weights and the
    average, for an exact resume).
    """
    s = settings
    was_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    info = init_distributed()
    sampler = _epoch_sampler(dataset, s, info)
    run = _start(model, dataset, s, info, out_dir, resume)
    pos = run.pos
    keys = _EpochKeys()
    loader = _loader(dataset, collate_fn, run, keys)
    show = info.is_main and sys.stderr.isatty()
    bar = tqdm(total=run.total_steps, initial=pos.step, disable=not show, unit="step", desc="train")
    run.net.train()
    last_ckpt: Path | None = None  # set on rank 0 only
    last_ckpt_step = -1  # the same on every rank: decides the collective final checkpoint
    t_run, start_step = time.perf_counter(), pos.step
    stop = False
    try:
        while pos.step < run.total_steps and not stop:
            epoch = pos.epoch
            batches = _epoch_batches(run, dataset, sampler, keys, loader)
            while pos.epoch == epoch and pos.step < run.total_steps and not stop:
                t0 = time.perf_counter()
                if masking is not None:
                    set_patch_dropout(model, masking.rate_at(pos.step, run.total_steps))
                metrics = _optimizer_step(run, _accumulate(run, batches), t0)
                _show_progress(run, bar, metrics, show)
                if s.checkpoint_every > 0 and pos.step % s.checkpoint_every == 0:
                    last_ckpt, last_ckpt_step = _checkpoint(run), pos.step
                if info.is_main and on_log is not None:
                    on_log(metrics, pos.step)
                stop = on_step is not None and on_step(pos.step)
        if last_ckpt_step != pos.step:
            last_ckpt = _checkpoint(run)
        if run.ema is not None:
            run.ema.copy_to(model)  # the run ends with the averaged weights
    finally:
        bar.close()
        if masking is not None:
            set_patch_dropout(model, 0.0)
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
    wall = time.perf_counter() - t_run
    samples_run = (pos.step - start_step) * s.batch_size * s.grad_accum_steps
    final = {k: v for k, v in pos.history[-1].items() if k == "loss" or k.startswith("loss_")}
    return TrainResult(
        steps=pos.step,
        history=pos.history,
        final=final,
        wall_s=wall,
        samples_per_s=samples_run / wall if wall > 0 else 0.0,
        checkpoint=last_ckpt,
        device=str(run.device),
        precision=precision_name(run.amp_dtype),
        world_size=run.world,
    )
