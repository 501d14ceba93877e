"""Data parallelism: 2 gloo processes on CPU match 1 process with the same global batch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.settings import train_settings
from vlp.train import train

pytestmark = pytest.mark.slow  # two training processes

# a collective that one rank never joins fails the test instead of hanging it
DEADLOCK = timedelta(seconds=120)

# Each rank averages its half of the global batch and DDP averages the two halves, which
# equals the single-process mean up to float summation order: weights agree to ~1e-7.
TOLERANCE = 1e-5


class Deterministic(torch.nn.Module):
    """No dropout, no cross-sample terms: the loss is a plain per-sample mean."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        return {"loss": loss, "loss_mse": loss}


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1).sin())


def _collate(items: list) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


SETTINGS = train_settings(
    epochs=2,
    checkpoint_every=2,
    batch_size=16,
    grad_accum_steps=2,
    lr=5e-2,
    warmup_steps=1,
    device="cpu",
    precision="fp32",
)


def _run(out: Path) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = Deterministic()
    res = train(model, _data(), _collate, SETTINGS, out)
    return model, res.history


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: 2 ranks share the cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", timeout=DEADLOCK, rank=rank, world_size=world
    )
    try:
        model, history = _run(Path(out))
        if rank == 0:
            safetensors.torch.save_model(model, str(Path(out) / "final.safetensors"))
            torch.save(history, Path(out) / "history.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path: Path) -> None:
    single, single_hist = _run(tmp_path / "single")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp")), nprocs=2)

    ddp = Deterministic()
    safetensors.torch.load_model(ddp, str(tmp_path / "ddp" / "final.safetensors"))
    for (name, a), (_, b) in zip(
        single.state_dict().items(), ddp.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0, msg=name)
    torch.manual_seed(0)
    assert not torch.equal(single.net[0].weight, Deterministic().net[0].weight)  # it trained
    ddp_hist = torch.load(tmp_path / "ddp" / "history.pt", weights_only=True)
    assert len(ddp_hist) == len(single_hist) == 4  # 64 // 32 samples per step x 2 epochs
    for a, b in zip(single_hist, ddp_hist, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOLERANCE  # logged loss is the rank average
    # rank 0 wrote each checkpoint once; the final one is not written twice (a rank
    # disagreeing about it would deadlock in the RNG-state gather)
    names = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert names == [".vlp-output", "step-00000002", "step-00000004"]
