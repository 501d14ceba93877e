"""How fast does the captioning LM teach the image tower each attribute, by caption choice?

The default-size model of params.yaml is trained from scratch with the captioning LM
objective alone (no ITC/ITM) for `--steps` optimizer steps of the pretraining loop, once per
arm:

- `all`: every pretraining caption, as `vlp pretrain` uses them;
- `first`: only each image's first caption (in the shapes data the canonical description,
  which lists every object in reading order with size, colour, shape and cell).

Each trained decoder then reads test captions teacher-forced (as `bench_grounding.py`) and its
next-word accuracy on shape, colour, size and position words is reported, on all test
captions and on the first test caption of each image.

The `first` arm learns the attributes several times faster: once the caption's word order
fixes which object comes next, the decoder can find it by position, and every attribute word
becomes a direct per-object label for the image tower. In the other captions objects come in
random order, so the next object is ambiguous until its attributes have been read.

    .venv/bin/python benchmarks/bench_lm_targets.py --steps 624
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_grounding import attribute_accuracy

from vlp.config import load_config
from vlp.data.images import image_transforms
from vlp.data.torch_data import PairsDataset, make_pretrain_collate
from vlp.models import build_model, build_tokenizer
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.pretrain import corpus
from vlp.train.loop import TrainSettings, train

LM_ONLY = ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0)


def run_arm(arm: str, cfg, data: Path, steps: int, tokenizer) -> dict:
    # "first" is what pretrain.caption_warmup_steps trains on
    dataset = PairsDataset(
        data, "pretrain", *image_transforms(cfg), first_caption_only=arm == "first"
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer, temperature=cfg.model.temperature)
    settings = TrainSettings.from_config(
        cfg.runtime,
        cfg.pretrain,
        seed=cfg.seed,
        max_steps=steps,
        checkpoint_every=0,
        log_every=10**9,
    )
    collate = make_pretrain_collate(tokenizer, cfg.model.max_text_length)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(
            VLPObjective(model, LM_ONLY, cfg.runtime.local_loss),
            dataset,
            collate,
            settings,
            Path(tmp),
        )
        train_s = time.perf_counter() - t0
    size = cfg.data.image_size
    return {
        "steps": steps,
        "pairs_seen": steps * settings.batch_size,
        "train_s": round(train_s, 1),
        "test_all_captions": attribute_accuracy(model, data, size),
        "test_first_captions": attribute_accuracy(model, data, size, first_only=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--steps", type=int, default=624, help="optimizer steps per arm")
    parser.add_argument("--arms", nargs="+", default=["all", "first"], choices=["all", "first"])
    args = parser.parse_args()
    cfg = load_config(args.params)
    tokenizer = build_tokenizer(cfg.model, corpus(args.data, cfg.pretrain.tokenizer_splits))
    report = {}
    for arm in args.arms:
        report[arm] = run_arm(arm, cfg, args.data, args.steps, tokenizer)
        for which in ("test_all_captions", "test_first_captions"):
            acc = {g: round(r["accuracy"], 3) for g, r in report[arm][which].items()}
            print(f"{arm} ({report[arm]['train_s']} s) on {which}: {acc}", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
