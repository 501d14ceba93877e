"""Trainable parameters, peak memory and speed of retrieval finetuning: whole model vs LoRA.

A random fusion model of a chosen width (ViT image tower, BERT text encoder and decoder)
is finetuned for a few steps by `vlp finetune retrieval`, once whole and once with
`adapter: lora`, each in its own process (a CPU process's peak resident memory cannot be
reset). Prints one JSON line per run: trainable and total parameters, `peak_memory_mb`
(CUDA: peak allocated; CPU: peak resident set while training) and samples/s. On CPU the
resident set keeps heap memory freed before training (data loading), which training then
reuses, so the CPU figure understates what gradients and optimizer state cost; CUDA's
allocator peak does not.

    .venv/bin/python benchmarks/bench_adapters.py --data data/shapes --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_model(data: Path, out: Path, hidden: int, layers: int, image_size: int) -> Path:
    """A random fusion model directory of the given width and depth, tokenizer from `data`."""
    import torch

    from vlp.config import load_config
    from vlp.data.manifest import read_pairs
    from vlp.models import build_model, train_tokenizer
    from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE

    cfg = load_config(ROOT / "params.yaml").model
    cfg = dataclasses.replace(
        cfg,
        image_tower="vit",
        hidden_size=hidden,
        num_heads=max(hidden // 64, 1),
        intermediate_size=4 * hidden,
        embed_dim=256,
        num_text_layers=layers,
        num_image_layers=layers,
    )
    torch.manual_seed(0)
    captions = [str(c) for c in read_pairs(data, "train")["caption"]]
    model = build_model(cfg, train_tokenizer(captions, cfg.vocab_size), 0.07)
    transform = {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3, "size": image_size}
    model.save_pretrained(out, {IMAGE_TRANSFORM_FILE: transform})
    return out


def finetune(model: Path, data: Path, work: Path, steps: int, batch: int, *sets: str) -> dict:
    """One `vlp finetune retrieval` run in its own process; its report."""
    args = [
        f"finetune.init_dir={model}",
        f"data.root={data}",
        f"finetune.out_dir={work / 'finetuned'}",
        f"runtime.plots_dir={work / 'plots'}",
        f"runtime.metrics_dir={work / 'metrics'}",
        f"finetune.retrieval.max_steps={steps}",
        f"finetune.retrieval.batch_size={batch}",
        "finetune.ablation=false",
        *sets,
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "vlp.cli", *(x for a in args for x in ("--set", a))]
    out = subprocess.run(
        [*cmd, "finetune", "retrieval"], env=env, capture_output=True, text=True, check=True
    ).stdout
    trainable, total = re.search(r"([\d,]+) of ([\d,]+) parameters train", out).groups()
    report = json.loads(out[out.index("{") :])
    return {
        "trainable": int(trainable.replace(",", "")),
        "total": int(total.replace(",", "")),
        "peak_memory_mb": round(report["peak_memory_mb"]),
        "samples_per_s": round(report["samples_per_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(a.data, Path(tmp) / "model", a.hidden, a.layers, a.image_size)
        runs = {"full": (), "lora": ("finetune.retrieval.adapter=lora",)}
        for name, sets in runs.items():
            work = Path(tmp) / name
            result = finetune(
                model, a.data, work, a.steps, a.batch, f"runtime.precision={a.precision}", *sets
            )
            print(json.dumps({"run": name, "hidden": a.hidden, "layers": a.layers, **result}))


if __name__ == "__main__":
    main()
