"""Speed of vlp's own text-to-image generator (`UNetGenerator`): training and sampling, fp32 vs bf16.

For each UNet size (`block_out_channels`), prints training steps/s (forward, backward and
AdamW step on a batch of random images with shapes-world prompts) and sampling images/s
(`--sample-steps` steps of `--sampler` with classifier-free guidance, two UNet passes per step), in
fp32 and under bf16 autocast. Wall seconds and process CPU seconds per thread are both
printed: on a shared machine the second is the better estimate of an idle one. There, run
it with OMP_NUM_THREADS=1: torch's two threads waiting for each other while other processes
hold the cores made steps over ten times slower than one thread.

    .venv/bin/python benchmarks/bench_generation.py [--image-size 48] [--batch-size 64]
        [--sizes 32,64,64 32,64,128] [--layers-per-block 1] [--head-dim 16]
        [--train-steps 3] [--sample-images 32] [--sample-steps 20] [--sampler ddim]

The text encoder is a randomly initialised vlp model of params.yaml's `model` section
(its cost is small beside the UNet's); no pipeline outputs are needed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "a large red circle at the top left",
    "a small blue square in the center and a green triangle on the right",
    "a yellow star to the left of a purple diamond",
    "two gray crosses",
]


def timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(wall s, process CPU s per thread) per call of `fn`, after one warm-up call."""
    fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    wall = (time.perf_counter() - w0) / repeats
    return wall, (time.process_time() - c0) / repeats / torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", nargs="+", default=["32,64,64", "32,64,128"])
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--sample-images", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "dpm_solver"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()

    from vlp.config import load_config
    from vlp.models import build_model, train_tokenizer
    from vlp.tasks.generation.model import UNetGenerator

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    torch.manual_seed(0)
    text = build_model(cfg.model, train_tokenizer(PROMPTS * 4, 200), 0.07)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1
    print(f"{torch.get_num_threads()} threads, image {args.image_size}, batch {args.batch_size}")
    for size in args.sizes:
        gen = UNetGenerator.build(
            text,
            image_size=args.image_size,
            block_out_channels=[int(c) for c in size.split(",")],
            layers_per_block=args.layers_per_block,
            attention_head_dim=args.head_dim,
            train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            cond_dropout=0.1,
            sampler=args.sampler,
            train_text_encoder=False,
            vae_from=None,
        )
        n_params = sum(p.numel() for p in gen.trainable_parameters()) / 1e6
        for precision in args.precisions:
            name = f"channels {size} lpb {args.layers_per_block} ({n_params:.2f}M) {precision}"
            measure(name, gen, images, prompts, precision, args)


def measure(
    name: str,
    gen: Any,
    images: torch.Tensor,
    prompts: list[str],
    precision: str,
    args: argparse.Namespace,
) -> None:
    """Print training steps/s and sampling images/s of `gen` in `precision`."""
    opt = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-4)
    bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = gen.training_loss(images, prompts)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            gen.sample(
                prompts[: args.sample_images],
                num_images_per_prompt=1,
                steps=args.sample_steps,
                guidance_scale=3.0,
                seed=0,
            )

    tw, tc = timed(step, args.train_steps)
    print(f"{name}: train {1 / tw:.2f} steps/s (cpu-time {1 / tc:.2f})", flush=True)
    sw, sc = timed(sample, 1)
    print(
        f"{name}: sample {args.sample_images / sw:.1f} images/s (cpu-time "
        f"{args.sample_images / sc:.1f}) at {args.sample_steps} {args.sampler} steps",
        flush=True,
    )


if __name__ == "__main__":
    main()
