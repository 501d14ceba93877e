"""Pretraining objectives across 2 gloo processes: ITC over the world batch, grads correct
(with the memory-linear local loss and with the whole world matrix alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.data.torch_data import make_pretrain_collate
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.models.vlp_model import VLPModel, build_model

pytestmark = pytest.mark.slow  # two processes

ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)
ITC_ONLY = ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0)


def _items(captions: list[str]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": torch.rand(3, 32, 32, generator=g) * 2 - 1,
            "caption": c,
            "image_id": f"img{min(i, 5)}",  # the last two captions share an image
            "caption_id": i,
        }
        for i, c in enumerate(captions)
    ]


def _grads(model: VLPModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, store: str, model_dir: str, captions: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = VLPModel.from_pretrained(model_dir).eval()  # eval: BatchNorm stats per batch
        collate = make_pretrain_collate(model.tokenizer, 16)
        items = _items(captions)
        half = len(items) // world
        batch = collate(items[rank * half : (rank + 1) * half])
        per_mode = {}
        for local_loss in (True, False):  # own rows x world batch; the whole world matrix
            model.zero_grad()
            VLPObjective(model, ITC_ONLY, local_loss=local_loss)(**batch)["loss"].backward()
            grads = _grads(model)
            for g in grads.values():  # what DDP does with gradients
                dist.all_reduce(g)
                g /= world
            per_mode[local_loss] = grads
        # all objectives with unequal batch sizes and caption lengths across ranks
        model.zero_grad()
        uneven = collate(items[:3] if rank == 0 else items[3:])
        out = VLPObjective(model, ALL, local_loss=True)(**uneven)
        out["loss"].backward()
        assert all(torch.isfinite(v) for v in out.values())
        assert model.itm_head.weight.grad is not None
        if rank == 0:
            torch.save(per_mode, Path(model_dir) / "ddp_grads.pt")
    finally:
        dist.destroy_process_group()


def test_itc_grads_across_two_processes_match_one(tiny_cfg, tokenizer, captions, tmp_path):
    # rank 0 gets short captions, rank 1 long ones: token ids are padded to gather them
    captions = sorted(captions, key=len)[:6] + ["a red circle", "a red circle"]
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), tokenizer, 0.07).eval()
    model.save_pretrained(tmp_path / "m")
    batch = make_pretrain_collate(tokenizer, 16)(_items(captions))
    VLPObjective(model, ITC_ONLY, local_loss=True)(**batch)["loss"].backward()
    single = _grads(model)

    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "m"), captions), nprocs=2)
    per_mode = torch.load(tmp_path / "m" / "ddp_grads.pt", weights_only=True)
    for local_loss, ddp in per_mode.items():
        assert single.keys() == ddp.keys()
        assert "image_tower.proj.weight" in ddp and "text_proj.weight" in ddp and "temp" in ddp
        for name, g in single.items():
            msg = f"{name} (local_loss={local_loss})"
            torch.testing.assert_close(ddp[name], g, atol=1e-6, rtol=1e-4, msg=msg)


def _clip_worker(rank: int, world: int, store: str, model_dir: str, captions: list[str]) -> None:
    from vlp.models.clip import CLIPDualEncoder
    from vlp.models.objectives import CLIPObjective

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = CLIPDualEncoder.from_pretrained(model_dir)
        items = _items(captions)
        half = len(items) // world
        batch = make_pretrain_collate(model.tokenizer, 16)(items[rank * half : (rank + 1) * half])
        CLIPObjective(model, 1.0, local_loss=True)(**batch)["loss"].backward()
        grads = _grads(model)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save(grads, Path(model_dir) / "ddp_grads.pt")
    finally:
        dist.destroy_process_group()


def test_clip_loss_grads_across_two_processes_match_one(tiny_cfg, tokenizer, captions, tmp_path):
    """CLIP's loss spans the world batch as ITC does: two half batches = one whole batch."""
    from vlp.models.clip import build_clip
    from vlp.models.objectives import CLIPObjective

    captions = sorted(captions, key=len)[:6] + ["a red circle", "a red circle"]
    torch.manual_seed(0)
    model = build_clip(tiny_cfg(family="clip"), tokenizer, 0.07)
    model.save_pretrained(tmp_path / "m")
    CLIPObjective(model, 1.0, local_loss=True)(
        **make_pretrain_collate(tokenizer, 16)(_items(captions))
    )["loss"].backward()
    single = _grads(model)

    mp.spawn(
        _clip_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "m"), captions), nprocs=2
    )
    ddp = torch.load(tmp_path / "m" / "ddp_grads.pt", weights_only=True)
    assert single.keys() == ddp.keys() and "clip.logit_scale" in ddp
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, atol=1e-6, rtol=1e-4, msg=name)
