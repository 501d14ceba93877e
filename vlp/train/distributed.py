"""Process-group setup for data-parallel training launched by `torchrun`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: rank, world size and local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process).

    Uses NCCL when CUDA is available, else gloo. A group that the caller already
    initialised (e.g. a test using `torch.multiprocessing.spawn`) is reused as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank())


@contextmanager
def distributed() -> Iterator[DistInfo]:
    """`init_distributed` for a block; tears down the process group only if it created it."""
    created = not (dist.is_available() and dist.is_initialized())
    info = init_distributed()
    try:
        yield info
    finally:
        if created and info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


def process_rank() -> int:
    """This process's global rank, without joining a process group (0 outside `torchrun`).

    The joined group's rank if there is one, else the `RANK` that torchrun sets.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
