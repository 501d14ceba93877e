"""Which image tower learns fastest on CPU? ITC-only pretraining for a fixed CPU-time budget.

For each tower (cnn, vit, convnext) the model of params.yaml's `model` section is trained
with the ITC objective alone on the shapes `pretrain` split for `--budget` seconds of process
CPU time (all threads counted, so the comparison is fair under a shared machine's load),
then scored zero-shot on the held-out `test` split: text->image and image->text R@1 from
cosine similarity (image->text counts a hit when any of the image's captions ranks first),
next to chance (1 / number of test images).

    .venv/bin/python benchmarks/bench_towers.py --budget 240 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlp.config import load_config
from vlp.data.images import ImageTransform, image_transforms
from vlp.data.shapes import generate_dataset
from vlp.data.torch_data import ImagesDataset, PairsDataset, make_pretrain_collate
from vlp.models import build_model, build_tokenizer
from vlp.models.objectives import ObjectiveWeights, VLPObjective

ITC_ONLY = ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0)


@torch.no_grad()
def zero_shot_r1(model, data_dir: Path, transform: ImageTransform, batch_size: int = 256) -> dict:
    """t2i and i2t R@1 of ITC cosine similarity on the test split."""
    model.eval()
    images = ImagesDataset(data_dir, "test", transform)
    pairs = PairsDataset(data_dir, "test", transform)
    image_feats = []
    for start in range(0, len(images), batch_size):
        px = torch.stack(
            [images[i]["pixel_values"] for i in range(start, min(start + batch_size, len(images)))]
        )
        image_feats.append(model.encode_image(px)[1])
    captions = list(pairs.frame["caption"])
    text_feats = []
    for start in range(0, len(captions), batch_size):
        enc = model.tokenize(captions[start : start + batch_size])
        text_feats.append(model.encode_text(enc["input_ids"], enc["attention_mask"])[1])
    row_of = {image_id: i for i, image_id in enumerate(images.image_ids)}
    owner = torch.tensor([row_of[i] for i in pairs.frame["image_id"]])
    sim = torch.cat(image_feats) @ torch.cat(text_feats).t()  # [n_images, n_texts]
    t2i = (sim.argmax(dim=0) == owner).float().mean().item()
    i2t = (owner[sim.argmax(dim=1)] == torch.arange(len(images))).float().mean().item()
    model.train()
    return {
        "t2i_r1": t2i,
        "i2t_r1": i2t,
        "chance_r1": 1 / len(images),
        "n_test_images": len(images),
    }


def train_itc(model, loader: DataLoader, budget_s: float, lr: float) -> dict:
    """Train ITC until `budget_s` seconds of process CPU time are spent."""
    objective = VLPObjective(model, ITC_ONLY, local_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    cpu0, wall0, steps, loss = time.process_time(), time.time(), 0, float("nan")
    while time.process_time() - cpu0 < budget_s:
        for batch in loader:
            out = objective(**batch)
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            steps, loss = steps + 1, out["loss"].item()
            if time.process_time() - cpu0 >= budget_s:
                break
    return {
        "steps": steps,
        "final_loss": loss,
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.time() - wall0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--towers", nargs="+", default=["cnn", "vit"])
    p.add_argument("--budget", type=float, default=240.0, help="CPU seconds per tower")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-pretrain", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--data", default=None, help="reuse/generate the dataset here")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.params, overrides=args.overrides)
    data_cfg = dataclasses.replace(
        cfg.data, n_pretrain=args.n_pretrain, n_train=0, n_val=0, n_test=args.n_test
    )
    data_dir = Path(args.data or tempfile.mkdtemp(prefix="bench_towers_")) / "shapes"
    if not (data_dir / "pairs.parquet").exists():
        t = time.time()
        generate_dataset(data_cfg, data_dir)
        print(f"generated {data_dir} in {time.time() - t:.0f}s")
    train_ds = PairsDataset(data_dir, "pretrain", *image_transforms(cfg))
    texts = list(train_ds.frame["caption"])

    results = {}
    for tower in args.towers:
        torch.manual_seed(0)
        mcfg = dataclasses.replace(cfg.model, image_tower=tower)
        tok = build_tokenizer(mcfg, texts)
        model = build_model(mcfg, tok, temperature=cfg.model.temperature)
        loader = DataLoader(
            train_ds,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=make_pretrain_collate(tok, mcfg.max_text_length),
        )
        run = train_itc(model, loader, args.budget, args.lr)
        scores = zero_shot_r1(model, data_dir, image_transforms(cfg)[0])
        results[tower] = {"params": model.num_parameters(), **run, **scores}
        print(tower, json.dumps(results[tower]), flush=True)

    print(
        f"\nITC-only, {args.budget:.0f} CPU-s per tower, {args.threads} thread(s), batch {args.batch_size}"
    )
    print(
        f"{'tower':9} {'params':>8} {'steps':>6} {'steps/cpu-s':>11} {'t2i R@1':>8} {'i2t R@1':>8} {'chance':>7}"
    )
    for tower, r in results.items():
        print(
            f"{tower:9} {r['params']:8d} {r['steps']:6d} {r['steps'] / r['cpu_s']:11.2f} "
            f"{r['t2i_r1']:8.3f} {r['i2t_r1']:8.3f} {r['chance_r1']:7.3f}"
        )


if __name__ == "__main__":
    main()
