"""Training throughput and MFU of transformers' ViTMAEForPreTraining, fp32 vs bf16 autocast.

Times full training steps (forward + backward + AdamW) of a freshly initialised
`ViTMAEForPreTraining` on synthetic images (one fixed random batch on the device; MAE draws
its own masks every step) and prints images/s, achieved FLOP/s and MFU per precision.

Model FLOPs per image, from the config alone (the "6 x params x tokens" rule with the
attention terms, backward = 2 x forward; L_e = 1 + int(N (1 - mask_ratio)) encoder tokens,
L_d = 1 + N decoder tokens, N = (S / p)^2 patches, d/i hidden/intermediate widths):

    6 x [ N 3p^2 d_e                                    patch embedding (every patch)
        + layers_e (L_e (4 d_e^2 + 2 d_e i_e) + 2 L_e^2 d_e)   encoder: projections, MLP, attention
        + L_e d_e d_d                                   decoder embedding
        + layers_d (L_d (4 d_d^2 + 2 d_d i_d) + 2 L_d^2 d_d)   decoder
        + L_d d_d 3p^2 ]                                pixel prediction

(norms, softmax, GELU and the loss are left out). torch's FlopCounterMode count of one step
is printed beside it as a check. MFU = formula FLOPs x images/s / peak FLOP/s of the
precision, from `--peak-tflops` or this table (dense, no sparsity):

    cpu   78.4 GFLOP/s per thread, fp32 and bf16: a core of the AMD EPYC (Zen 3, AVX2,
          ~2.45 GHz) this was written on, 2.45 GHz x 32 FLOP/cycle (2 x 256-bit FMA), times
          torch's threads (157 GFLOP/s for this 2-core machine); no native bf16, so bf16 is
          emulated and measured against the same peak
    h100  66.9 TFLOP/s fp32 (no TF32), 989 TFLOP/s bf16 (H100 SXM datasheet)
    h200  same as h100 (same GH100 compute)

Presets: `tiny` is params.yaml's ViT (`model` sizes, `pretrain_vision` decoder and mask
ratio) at `data.image_size`; `vit-b16-224` is MAE's ViT-B/16 (768 x 12, decoder 512 x 8) at
224 px, meant for a GPU (on a CPU use `--steps 2 --batch-size 4`).

    .venv/bin/python benchmarks/bench_mae.py [--preset tiny|vit-b16-224] [--device auto]
        [--steps 20] [--batch-size N] [--precisions fp32,bf16] [--peak-tflops T] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_FLOPS = {  # device -> precision -> dense peak FLOP/s (see the module docstring)
    "cpu": {"fp32": 78.4e9, "bf16": 78.4e9},  # per thread
    "h100": {"fp32": 66.9e12, "bf16": 989e12},
    "h200": {"fp32": 66.9e12, "bf16": 989e12},
}
VIT_B16_224 = dict(
    image_size=224,
    patch_size=16,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=2048,
    mask_ratio=0.75,
    norm_pix_loss=True,
)


def preset_config(name: str, params: str) -> tuple[Any, int]:
    """(ViTMAEConfig, default batch size) of a preset."""
    from transformers import ViTMAEConfig

    if name == "vit-b16-224":
        return ViTMAEConfig(**VIT_B16_224), 128
    from vlp.config import load_config

    cfg = load_config(params)
    m, v = cfg.model, cfg.pretrain_vision
    config = ViTMAEConfig(
        image_size=cfg.data.image_size,
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_image_layers,
        num_attention_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        decoder_hidden_size=v.decoder_hidden_size,
        decoder_num_hidden_layers=v.decoder_num_layers,
        decoder_num_attention_heads=v.decoder_num_heads,
        decoder_intermediate_size=v.decoder_intermediate_size,
        mask_ratio=v.mask_ratio,
        norm_pix_loss=v.norm_pix_loss,
    )
    return config, v.batch_size


def flops_per_image(c: Any) -> float:
    """Training FLOPs of one image by the module docstring's formula."""
    n = (c.image_size // c.patch_size) ** 2
    pix = 3 * c.patch_size**2
    le, ld = 1 + int(n * (1 - c.mask_ratio)), 1 + n
    de, dd = c.hidden_size, c.decoder_hidden_size

    def layers(count: int, tokens: int, d: int, inter: int) -> int:
        return count * (tokens * (4 * d * d + 2 * d * inter) + 2 * tokens * tokens * d)

    forward = (
        n * pix * de
        + layers(c.num_hidden_layers, le, de, c.intermediate_size)
        + le * de * dd
        + layers(c.decoder_num_hidden_layers, ld, dd, c.decoder_intermediate_size)
        + ld * dd * pix
    )
    return 6.0 * forward


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float:
    """The precision's peak FLOP/s of `device`: `--peak-tflops`, else PEAK_FLOPS."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cpu":
        return PEAK_FLOPS["cpu"][precision] * torch.get_num_threads()
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100"):
        if key in name:
            return PEAK_FLOPS[key][precision]
    raise SystemExit(f"no peak FLOP/s known for {name!r}: pass --peak-tflops")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(config: Any, images: torch.Tensor, dtype: torch.dtype | None, steps: int):
    """Per-step seconds of `steps` AdamW steps, and torch's FLOP count of one step."""
    from transformers import ViTMAEForPreTraining

    device = images.device
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(pixel_values=images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, counter.get_total_flops(), loss, model.num_parameters()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "vit-b16-224"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after one untimed)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="overrides PEAK_FLOPS")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    config, batch = preset_config(args.preset, args.params)
    batch = args.batch_size or batch
    torch.manual_seed(0)
    images = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    per_image = flops_per_image(config)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.preset}: {config.image_size}px patch {config.patch_size}, encoder "
          f"{config.hidden_size}x{config.num_hidden_layers}, decoder {config.decoder_hidden_size}"
          f"x{config.decoder_num_hidden_layers}, mask {config.mask_ratio}, batch {batch}; {name}")  # fmt: skip
    rows = []
    for precision in args.precisions.split(","):
        dtype = torch.bfloat16 if precision == "bf16" else None
        times, counted, loss, n_params = train_steps(config, images, dtype, args.steps)
        ips = batch / statistics.median(times)
        peak = peak_flops(device, precision, args.peak_tflops)
        rows.append(
            {
                "precision": precision,
                "params": n_params,
                "images_per_s": ips,
                "gflop_per_image": per_image / 1e9,
                "counted_gflop_per_image": counted / batch / 1e9,
                "achieved_tflops": per_image * ips / 1e12,
                "peak_tflops": peak / 1e12,
                "mfu": per_image * ips / peak,
                "loss": loss,
            }
        )
    print(f"{'prec':5} {'params':>8} {'img/s':>9} {'GFLOP/img':>9} {'counted':>8} "
          f"{'TFLOP/s':>8} {'peak':>7} {'MFU':>6}")  # fmt: skip
    for r in rows:
        print(
            f"{r['precision']:5} {r['params'] / 1e6:7.2f}M {r['images_per_s']:9.3g} "
            f"{r['gflop_per_image']:9.4f} {r['counted_gflop_per_image']:8.4f} "
            f"{r['achieved_tflops']:8.4f} {r['peak_tflops']:7.2f} {100 * r['mfu']:5.1f}%"
        )
    if args.out:
        result = {"preset": args.preset, "device": name, "batch_size": batch, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
