"""What pretraining at published scale costs: FLOPs measured per sample, throughput published.

Counts, with torch.utils.flop_counter.FlopCounterMode, the FLOPs of one training step
(forward + backward) per sample of

- vlp's fusion model at BLIP's ViT-B size (ViT-B/16 at 224 px, 12-layer BERT-base text
  encoder and decoder, 30 text tokens, a 30,522-token vocabulary), per objective: ITC alone,
  ITC + ITM (one positive and two hard-negative fusion passes per sample), and all three;
  plus the forward passes of BLIP's momentum image and text encoders, which BLIP runs and
  vlp does not;
- CLIP ViT-B/32 (transformers' CLIPModel: 224 px, 77 text tokens), OpenCLIP's model.

It then divides published wall-clock figures by these FLOPs: the samples/s per GPU each
published run reached, the model FLOP utilisation (MFU) that implies against the A100's
dense bf16 peak, and the GPU-hours the BLIP recipe costs at each MFU. The published
figures are constants below, with their sources; nothing about a GPU is measured here.

    .venv/bin/python benchmarks/bench_costs.py [--out benchmarks/results/costs.json]

Runs on the CPU in about a minute (a batch of 2 through ViT-B-sized models).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

A100_BF16_PEAK = 312e12  # dense FLOP/s, NVIDIA A100 SXM datasheet
A100_TF32_PEAK = 156e12
BATCH = 2

# Published runs: (samples seen, GPUs, hours). Sources in docs/scaling.md.
BLIP_SAMPLES = 14e6 * 20  # 14M CapFilt images, 20 epochs (BLIP paper, section 4.1)
BLIP_GPUS = 32  # two 16-GPU A100 nodes (paper); "3-4 days" (salesforce/BLIP issues 2 and 19)
BLIP_HOURS = (72.0, 96.0)
OPENCLIP_SAMPLES = 12.8e9  # ViT-B/32, LAION-400M, 32 epochs (OpenCLIP README)
OPENCLIP_GPUS = 128  # A100 40GB
OPENCLIP_HOURS = (36.0, 36.0)


def count(fn) -> int:
    """FLOPs of `fn()` (forward, and backward when it calls it)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _bert_vocab(size: int) -> dict[str, int]:
    """A BERT vocabulary of `size` tokens (special tokens, then filler words)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(size - len(specials))]
    return {t: i for i, t in enumerate(specials + words)}


def fusion_flops() -> dict[str, float]:
    """Per-sample training FLOPs of vlp's fusion model at BLIP ViT-B size, per objective."""
    from transformers import BertTokenizerFast

    from vlp.config import load_config
    from vlp.models import build_model
    from vlp.models.objectives import ObjectiveWeights, VLPObjective

    cfg = load_config("params.yaml").model
    cfg = dataclasses.replace(
        cfg,
        image_tower="vit",
        hidden_size=768,
        intermediate_size=3072,
        num_heads=12,
        num_text_layers=12,
        num_image_layers=12,
        patch_size=16,
        embed_dim=256,
        max_text_length=30,
    )
    tokenizer = BertTokenizerFast(vocab=_bert_vocab(30522))
    tokenizer.add_special_tokens({"additional_special_tokens": ["[DEC]", "[ENC]"]})
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, temperature=0.07)
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(BATCH, 3, 224, 224, generator=g),
        "input_ids": torch.randint(10, 30000, (BATCH, 30), generator=g),
        "attention_mask": torch.ones(BATCH, 30, dtype=torch.long),
        "image_ids": torch.arange(BATCH),
    }
    batch["input_ids"][:, 0] = tokenizer.cls_token_id
    out: dict[str, float] = {}
    for name, w in (
        ("itc", ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0)),
        ("itc_itm", ObjectiveWeights(itc=1.0, itm=1.0, lm=0.0)),
        ("itc_itm_lm", ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)),
    ):
        objective = VLPObjective(model, w, local_loss=True)
        out[name] = count(lambda o=objective: o(**batch)["loss"].backward()) / BATCH
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        image = count(lambda: model.encode_image(batch["pixel_values"])) / BATCH
        text = count(lambda: model.encode_text(batch["input_ids"], batch["attention_mask"])) / BATCH
    out["image_forward"] = image
    out["momentum_forward"] = image + text  # BLIP's momentum ViT and text encoder, no backward
    out["blip_recipe"] = out["itc_itm_lm"] + out["momentum_forward"]
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    return out


def clip_flops() -> dict[str, float]:
    """Per-sample training FLOPs of CLIP ViT-B/32 (contrastive loss, 77 text tokens)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=g)
    ids = torch.randint(0, 49000, (BATCH, 77), generator=g)
    flops = count(
        lambda: model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
    )
    return {"train": flops / BATCH, "params": float(sum(p.numel() for p in model.parameters()))}


def implied(samples: float, gpus: int, hours: float, flops_per_sample: float) -> dict[str, float]:
    """Samples/s per GPU and MFU (of the A100 bf16 and TF32 peaks) a published run reached."""
    per_gpu = samples / (gpus * hours * 3600)
    achieved = per_gpu * flops_per_sample
    return {
        "samples_per_s_per_gpu": per_gpu,
        "tflops_per_gpu": achieved / 1e12,
        "mfu_bf16": achieved / A100_BF16_PEAK,
        "mfu_tf32": achieved / A100_TF32_PEAK,
        "gpu_hours": gpus * hours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/costs.json")
    args = ap.parse_args()
    fusion = fusion_flops()
    clip = clip_flops()

    blip_runs = [implied(BLIP_SAMPLES, BLIP_GPUS, h, fusion["blip_recipe"]) for h in BLIP_HOURS]
    oc = implied(OPENCLIP_SAMPLES, OPENCLIP_GPUS, OPENCLIP_HOURS[0], clip["train"])
    recipe_flops = BLIP_SAMPLES * fusion["blip_recipe"]
    hours_at = {
        f"{100 * m:.1f}%": recipe_flops / (m * A100_BF16_PEAK) / 3600
        for m in (0.40, oc["mfu_bf16"], blip_runs[1]["mfu_bf16"], blip_runs[0]["mfu_bf16"])
    }
    result = {
        "flops_per_sample": {"fusion_vit_b16": fusion, "clip_vit_b32": clip},
        "published": {"blip_3_days": blip_runs[0], "blip_4_days": blip_runs[1], "openclip": oc},
        "blip_recipe_flops": recipe_flops,
        "blip_recipe_a100_gpu_hours_at_mfu": hours_at,
    }
    g = 1e9
    print(f"fusion ViT-B/16 + BERT-base ({fusion['params'] / 1e6:.0f}M params), GFLOPs/sample:")
    for k in ("itc", "itc_itm", "itc_itm_lm", "momentum_forward", "blip_recipe"):
        print(f"  {k:18s} {fusion[k] / g:8.1f}")
    print(
        f"CLIP ViT-B/32 ({clip['params'] / 1e6:.0f}M params): {clip['train'] / g:.1f} GFLOPs/sample"
    )
    for name, r in result["published"].items():
        print(
            f"{name:12s} {r['samples_per_s_per_gpu']:7.1f} samples/s/GPU  "
            f"{r['tflops_per_gpu']:6.1f} TFLOP/s  MFU {100 * r['mfu_bf16']:5.1f}% of bf16 "
            f"({100 * r['mfu_tf32']:5.1f}% of TF32)  {r['gpu_hours']:,.0f} GPU-h"
        )
    print(f"BLIP recipe: {recipe_flops:.2e} FLOPs; A100 GPU-hours at MFU:")
    for m, h in hours_at.items():
        print(f"  {m:>4s}: {h:8,.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
