"""Parameter-efficient finetuning of a task: its `finetune.<task>` adapter keys, through peft.

With `adapter: lora` (or `dora`) the pretrained model gets adapters on the modules
`lora_targets` names (default: its family's `lora_targets`) and only they train, with
whatever the task adds around the model (VQA's answer decoder) training whole; the base
stays bit for bit as it was, BatchNorm statistics included. The task model directory holds
the base and the adapter (`vlp.models.adapters`).
"""

from __future__ import annotations

import contextlib
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.adapters import AdapterSpec, attach_adapter

if TYPE_CHECKING:
    from peft import PeftModel


def task_adapter(
    task: str, tcfg: Any, model: torch.nn.Module, module: torch.nn.Module
) -> PeftModel | None:
    """Attach `finetune.<task>`'s adapter to `model` (the family model inside the task's
    trained `module`); None when the task's `adapter` is null or it has none."""
    from vlp.models.family import get_family

    kind = getattr(tcfg, "adapter", None)
    if kind is None:
        return None
    where = f"finetune.{task}"
    if any(getattr(m, "freeze_encoders", False) for m in module.modules()):
        raise ConfigError(
            f"{where}.adapter: {kind} adapts the model's encoders, which "
            f"{where}.freeze_encoders keeps frozen (no gradient reaches them): set it to false"
        )
    targets = tcfg.lora_targets
    if targets is None:
        targets = get_family(model.cfg.family).lora_targets
    spec = AdapterSpec(kind, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_dropout, tuple(targets))
    adapted = attach_adapter(model, spec, where)
    keep_norm_statistics(model)
    return adapted


def _stay_in_eval(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(module, False)


def keep_norm_statistics(model: torch.nn.Module) -> None:
    """Keep `model`'s BatchNorm layers in eval mode whatever `train()` asks: a frozen base
    normalises with its own statistics and leaves them as they were."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(_stay_in_eval, module)
            module.train(False)


def reset_peak_memory() -> None:
    """Start counting peak memory afresh: CUDA's allocator statistics, and on Linux the
    process's peak resident set (`VmHWM`, reset through /proc/self/clear_refs)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # not Linux, or not allowed: the peak then counts from the process's start
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5\n")


def peak_memory_mb(device: str) -> float:
    """Peak memory of a run on `device` in MiB since `reset_peak_memory`: CUDA memory
    allocated, or on CPU the process's peak resident set (weights, gradients, optimizer
    state, activations, and whatever else the process holds)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
