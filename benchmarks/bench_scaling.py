"""Two costs of scaling training on CPU: activation checkpointing, and 1 vs 2 processes.

- `checkpointing`: one pretraining step (ITC + ITM + LM, forward + backward) of a ViT-tower
  model with `runtime.gradient_checkpointing` off and on: peak resident memory the step adds
  (each arm in a fresh process) and the median step time.
- `ddp`: the real `vlp.train.train` loop on the same global batch, 1 process vs 2 gloo
  processes (one thread each, so each process has a core): training samples/s and the
  scaling efficiency = samples/s of 2 / (2 x samples/s of 1).

    python benchmarks/bench_scaling.py [checkpointing|ddp|all] [--batch 32] [--size 64]

The model is params.yaml's `model` section with `--tower`, `--layers` and `--hidden`
applied; the data are random images with shapes captions. No pipeline outputs are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles above a small yellow star",
    "a big blue square below a red triangle",
    "a yellow star right of a red circle",
]


def _model_and_data(args: argparse.Namespace, n: int):
    from vlp.config import load_config
    from vlp.data.torch_data import make_pretrain_collate
    from vlp.models.tokenizer import train_tokenizer
    from vlp.models.vlp_model import build_model

    cfg = load_config("params.yaml").model
    cfg = dataclasses.replace(
        cfg,
        image_tower=args.tower,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_heads=max(1, args.hidden // 64),
        num_image_layers=args.layers,
        num_text_layers=args.layers,
        patch_size=8,
    )
    tokenizer = train_tokenizer(CAPTIONS * 4, vocab_size=200)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, cfg.temperature)
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "pixel_values": torch.rand(3, args.size, args.size, generator=g) * 2 - 1,
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "image_id": f"img{i}",
        }
        for i in range(n)
    ]
    return model, items, make_pretrain_collate(tokenizer, cfg.max_text_length)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one_checkpointing_arm(args: argparse.Namespace, on: bool) -> dict[str, float]:
    from vlp.models.activation_checkpointing import enable_activation_checkpointing
    from vlp.models.objectives import ObjectiveWeights, VLPObjective

    torch.set_num_threads(args.threads)
    model, items, collate = _model_and_data(args, args.batch)
    objective = VLPObjective(
        model, ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0), local_loss=True
    ).train()
    if on:
        enable_activation_checkpointing(objective)
    batch = collate(items)
    objective(**batch)["loss"].backward()  # allocator warm-up, gradients allocated
    before = _rss_kib()
    times = []
    for _ in range(args.repeats):
        objective.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        objective(**batch)["loss"].backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": statistics.median(times), "peak_mib": max(peak - before, 0) / 1024}


def checkpointing(args: argparse.Namespace) -> None:
    arms = {}
    for on in (False, True):
        cmd = [sys.executable, __file__, "checkpointing", *_shared(args), "--arm", str(int(on))]
        arms[on] = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        )
    off, on_ = arms[False], arms[True]
    print(
        f"\nActivation checkpointing: {args.tower} tower, {args.layers} layers per tower, "
        f"hidden {args.hidden}, batch {args.batch}, {args.size} px, {args.threads} threads"
    )
    print("| gradient_checkpointing | step s (median) | peak MiB added by a step |")
    print("|---|---|---|")
    print(f"| false | {off['step_s']:.2f} | {off['peak_mib']:.0f} |")
    print(f"| true | {on_['step_s']:.2f} | {on_['peak_mib']:.0f} |")
    print(
        f"memory x{on_['peak_mib'] / max(off['peak_mib'], 1e-9):.2f}, "
        f"time x{on_['step_s'] / off['step_s']:.2f}"
    )


def _train_worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    from vlp.config import load_config
    from vlp.models.objectives import ObjectiveWeights, VLPObjective
    from vlp.train import TrainSettings, train

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, items, collate = _model_and_data(args, args.batch * (args.steps + 1))
        params = load_config("params.yaml")
        settings = TrainSettings.from_config(
            params.runtime,
            params.pretrain,
            seed=params.seed,
            checkpoint_every=0,
            max_steps=args.steps,
            batch_size=args.batch,
            device="cpu",
            precision="fp32",
            log_every=10**6,
        )
        objective = VLPObjective(model, ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0), local_loss=True)
        result = train(objective, items, collate, settings, Path(out) / f"w{world}")
        if rank == 0:
            Path(out, f"w{world}.json").write_text(json.dumps(result.samples_per_s))
    finally:
        if world > 1:
            dist.destroy_process_group()


def ddp(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _train_worker(0, 1, "", args, tmp)
        mp.spawn(_train_worker, args=(2, f"{tmp}/store", args, tmp), nprocs=2)
        one = json.loads(Path(tmp, "w1.json").read_text())
        two = json.loads(Path(tmp, "w2.json").read_text())
    print(
        f"\nData parallel on this CPU: {args.tower} tower, {args.layers} layers, hidden "
        f"{args.hidden}, global batch {args.batch}, {args.size} px, {args.steps} steps, "
        "1 thread per process"
    )
    print("| processes | training samples/s |")
    print("|---|---|")
    print(f"| 1 | {one:.1f} |\n| 2 | {two:.1f} |")
    print(f"speed-up x{two / one:.2f}, scaling efficiency {two / (2 * one):.0%}")


def _shared(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k}={getattr(args, k)}"
        for k in ("batch", "size", "tower", "layers", "hidden", "repeats", "threads", "steps")
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=("checkpointing", "ddp", "all"))
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--size", type=int, default=64, help="image side, px")
    ap.add_argument("--tower", default="vit", choices=("vit", "convnext", "cnn"))
    ap.add_argument("--layers", type=int, default=4, help="layers of each tower")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (checkpointing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (checkpointing)")
    ap.add_argument("--steps", type=int, default=8, help="training steps (ddp)")
    ap.add_argument("--arm", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm is not None:
        print(json.dumps(one_checkpointing_arm(args, bool(args.arm))))
        return
    if args.what in ("checkpointing", "all"):
        checkpointing(args)
    if args.what in ("ddp", "all"):
        ddp(args)


if __name__ == "__main__":
    main()
