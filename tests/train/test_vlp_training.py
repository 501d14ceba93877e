"""The loop on the real tiny VLPModel (smoke config): exact resume and 2-process DDP."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.settings import train_settings
from vlp.config import Config, ModelConfig
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.train import train

pytestmark = pytest.mark.slow  # two-process training and resumed runs

# a collective that one rank never joins fails the test instead of hanging it
DEADLOCK = timedelta(seconds=120)

# ITC gathers features across ranks with gradients; with a ViT tower (LayerNorm only, no
# BatchNorm statistics that depend on the per-rank batch) 2 ranks equal 1 process up to
# float summation order: losses agree to 1e-5. Adam divides each gradient by its running
# RMS, which turns summation noise on near-zero gradients into up to ~lr-sized steps, so
# weights are compared to 1e-4 (5% of lr=2e-3; measured worst case 2e-5 after 3 steps).
ITC_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


def _parts(data_dir: Path, model_cfg: ModelConfig, tok_dir: Path, weights: ObjectiveWeights):
    """(objective to train, its model, dataset, collate_fn)."""
    from vlp.data.images import ImageTransform
    from vlp.data.torch_data import PairsDataset, make_pretrain_collate
    from vlp.models import build_model, load_tokenizer

    tok = load_tokenizer(tok_dir, str(tok_dir))
    torch.manual_seed(0)
    model = build_model(model_cfg, tok, 0.07)
    dataset = PairsDataset(
        data_dir, "pretrain", ImageTransform(32, "squash", (0.5,) * 3, (0.5,) * 3)
    )
    objective = VLPObjective(model, weights, local_loss=True)
    return objective, model, dataset, make_pretrain_collate(tok, model_cfg.max_text_length)


@pytest.fixture(scope="module")
def tok_dir(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlp.models import save_tokenizer, train_tokenizer
    from vlp.pretrain import corpus

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_tokenizer(corpus(smoke_data, ["pretrain", "train"]), 200), out)
    return out


ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)
ITC_ONLY = ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0)
SETTINGS = train_settings(
    max_steps=6, batch_size=16, lr=2e-3, warmup_steps=1, checkpoint_every=2, device="cpu"
)


def test_vlp_resume_mid_epoch_is_exact(
    smoke_cfg: Config, smoke_data: Path, tok_dir: Path, tmp_path: Path
) -> None:
    # Full objective: ITM draws hard negatives with torch.multinomial, so this also checks
    # that the RNG state is restored.
    objective, model, data, collate = _parts(smoke_data, smoke_cfg.model, tok_dir, ALL)
    ref = train(objective, data, collate, SETTINGS, tmp_path / "full")

    def kill_at_5(metrics: dict[str, float], step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    again, _, _, _ = _parts(smoke_data, smoke_cfg.model, tok_dir, ALL)
    with pytest.raises(KeyboardInterrupt):
        train(again, data, collate, SETTINGS, tmp_path / "run", on_log=kill_at_5)
    objective, resumed, _, _ = _parts(smoke_data, smoke_cfg.model, tok_dir, ALL)
    res = train(objective, data, collate, SETTINGS, tmp_path / "run", resume=True)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    for (name, a), (_, b) in zip(
        model.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _worker(
    rank: int,
    store: str,
    out: str,
    data: str,
    mcfg: dict,
    tok: str,
    w: ObjectiveWeights,
    precision: str,
) -> None:
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: 2 ranks share the cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", timeout=DEADLOCK, rank=rank, world_size=2
    )
    try:
        objective, model, dataset, collate = _parts(Path(data), ModelConfig(**mcfg), Path(tok), w)
        settings = dataclasses.replace(
            SETTINGS, max_steps=3, checkpoint_every=0, precision=precision
        )
        res = train(objective, dataset, collate, settings, Path(out))
        safetensors.torch.save_model(model, str(Path(out) / f"rank{rank}.safetensors"))
        if rank == 0:
            torch.save(res.history, Path(out) / "history.pt")
    finally:
        dist.destroy_process_group()


def _spawn(
    tmp: Path,
    data: Path,
    mcfg: ModelConfig,
    tok: Path,
    w: ObjectiveWeights,
    precision: str = "auto",
) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    args = (
        str(tmp / "store"),
        str(tmp),
        str(data),
        dataclasses.asdict(mcfg),
        str(tok),
        w,
        precision,
    )
    mp.spawn(_worker, args=args, nprocs=2)


def _load(mcfg: ModelConfig, data: Path, tok: Path, path: Path) -> torch.nn.Module:
    _, model, _, _ = _parts(data, mcfg, tok, ALL)
    safetensors.torch.load_model(model, str(path))
    return model


def test_vlp_itc_two_processes_match_one(
    smoke_cfg: Config, smoke_data: Path, tok_dir: Path, tmp_path: Path
) -> None:
    mcfg = dataclasses.replace(smoke_cfg.model, image_tower="vit", patch_size=8)
    objective, model, data, collate = _parts(smoke_data, mcfg, tok_dir, ITC_ONLY)
    single = train(
        objective,
        data,
        collate,
        dataclasses.replace(SETTINGS, max_steps=3, precision="fp32"),
        tmp_path / "one",
    )
    _spawn(tmp_path / "ddp", smoke_data, mcfg, tok_dir, ITC_ONLY, precision="fp32")
    ddp = _load(mcfg, smoke_data, tok_dir, tmp_path / "ddp" / "rank0.safetensors")
    for (name, a), (_, b) in zip(model.state_dict().items(), ddp.state_dict().items(), strict=True):
        torch.testing.assert_close(
            a, b, atol=WEIGHT_TOLERANCE, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    hist = torch.load(tmp_path / "ddp" / "history.pt", weights_only=True)
    assert [h["loss_itc"] for h in hist] == pytest.approx(
        [h["loss_itc"] for h in single.history[:3]], abs=ITC_TOLERANCE
    )


def test_vlp_full_objective_runs_on_two_processes(
    smoke_cfg: Config, smoke_data: Path, tok_dir: Path, tmp_path: Path
) -> None:
    _spawn(tmp_path, smoke_data, smoke_cfg.model, tok_dir, ALL)
    hist = torch.load(tmp_path / "history.pt", weights_only=True)
    assert len(hist) == 3
    assert all(
        math.isfinite(h[k]) for h in hist for k in ("loss", "loss_itc", "loss_itm", "loss_lm")
    )
    assert {"loss_itc", "loss_itm", "loss_lm"} <= set(hist[0])
    r0 = _load(smoke_cfg.model, smoke_data, tok_dir, tmp_path / "rank0.safetensors")
    r1 = _load(smoke_cfg.model, smoke_data, tok_dir, tmp_path / "rank1.safetensors")
    for (name, a), (_, b) in zip(r0.state_dict().items(), r1.state_dict().items(), strict=True):
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per rank (broadcast from rank 0 each forward)
        assert torch.equal(a, b), name  # DDP keeps the replicas identical
