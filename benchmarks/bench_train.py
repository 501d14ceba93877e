"""Training throughput and model FLOP utilisation (MFU) of the pretraining loop, fp32 vs bf16.

Measures the machine's own matmul peak (fp32 and bf16), counts the FLOPs of one training
step (forward + backward) with torch.utils.flop_counter.FlopCounterMode, runs the real
`vlp.train.train` loop for a few steps per precision and prints samples/s, achieved
FLOP/s and MFU = achieved / measured peak of that precision.

    .venv/bin/python benchmarks/bench_train.py [--profile default] [--device auto|cpu|cuda]
        [--steps 12] [--batch-size N]

The model and batch come from params.yaml (`model`, `pretrain`); the data is a small
freshly generated shapes set, so the script needs no pipeline outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.5) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def step_flops(model: torch.nn.Module, batch: dict, dtype: torch.dtype | None) -> int:
    """FLOPs of one forward + backward on `batch`."""
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with counter:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(**batch)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--compile",
        default="off",
        choices=("off", "on", "both"),
        help="runtime.compile arms: torch.compile'd steps (the first, compiling, step excluded)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlp.config import load_config
    from vlp.data.images import image_transforms
    from vlp.data.shapes import generate_dataset
    from vlp.data.torch_data import PairsDataset, make_pretrain_collate
    from vlp.models import build_model, build_tokenizer
    from vlp.models.objectives import ObjectiveWeights, VLPObjective
    from vlp.pretrain import corpus
    from vlp.train import TrainSettings, train
    from vlp.train.distributed import DistInfo
    from vlp.train.settings import resolve_device

    cfg = load_config(args.params, args.profile)
    device = resolve_device(args.device, DistInfo())
    bs = args.batch_size or cfg.pretrain.batch_size
    n_images = max(64, (args.steps + 2) * bs // cfg.data.captions_per_image + 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    data_cfg = dataclasses.replace(cfg.data, n_pretrain=n_images, n_train=16, n_val=4, n_test=4)
    generate_dataset(data_cfg, tmp / "data")
    dataset = PairsDataset(tmp / "data", "pretrain", *image_transforms(cfg))
    tokenizer = build_tokenizer(cfg.model, corpus(tmp / "data", cfg.pretrain.tokenizer_splits))
    collate = make_pretrain_collate(tokenizer, cfg.model.max_text_length)

    n = 4096 if device.type == "cuda" else 1024
    peaks = {
        "fp32": matmul_peak(device, torch.float32, n),
        "bf16": matmul_peak(device, torch.bfloat16, n),
    }
    print(f"device {device}  threads {torch.get_num_threads()}  profile {cfg.profile}  batch {bs}")
    for name, peak in peaks.items():
        print(f"matmul peak {name}: {peak / 1e9:8.1f} GFLOP/s  ({n}x{n})")

    batch = collate([dataset[i] for i in range(bs)])
    p = cfg.pretrain
    weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    arms = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    for precision, compiled in ((p, c) for p in args.precisions.split(",") for c in arms):
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer, temperature=cfg.model.temperature).to(device)
        objective = VLPObjective(model, weights, cfg.runtime.local_loss)
        dtype = torch.bfloat16 if precision == "bf16" else None
        flops = step_flops(objective, batch, dtype)
        settings = TrainSettings.from_config(
            cfg.runtime,
            cfg.pretrain,
            seed=cfg.seed,
            batch_size=bs,
            grad_accum_steps=1,
            max_steps=args.steps,
            precision=precision,
            device=device.type,
            checkpoint_every=0,
            compile=compiled,
        )
        cpu0 = time.process_time()
        res = train(objective, dataset, collate, settings, tmp / f"run-{precision}-{compiled}")
        # CPU seconds per step: far less sensitive than wall time to other load on the box
        cpu_per_step = (time.process_time() - cpu0) / res.steps
        # skip the first steps (allocator / kernel warm-up)
        sps = statistics.median(h["samples_per_s"] for h in res.history[2:] or res.history)
        achieved = flops / bs * sps
        first = res.history[0]["samples_per_s"]
        print(
            f"{precision}{' compiled' if compiled else ''}: first step {bs / first:.1f} s  "
            f"{model.num_parameters() / 1e6:.2f}M params  "
            f"{flops / 1e9:7.2f} GFLOP/step  {sps:7.1f} samples/s  "
            f"{achieved / 1e9:7.1f} GFLOP/s  MFU {100 * achieved / peaks[precision]:5.1f}% "
            f"of {precision} peak  ({100 * achieved / peaks['fp32']:5.1f}% of fp32 peak)  "
            f"{cpu_per_step:.3f} CPU-s/step  "
            f"loss {res.history[0]['loss']:.3f}->{res.final['loss']:.3f}"
        )


if __name__ == "__main__":
    main()
