"""FLIP on the shapes world: pretraining speed and zero-shot retrieval at patch dropout 0 / 0.5 / 0.75.

A ViT-tower model of params.yaml's `model` section is pretrained as the pretrain stage does
(`vlp.train.train` with the joint ITC + ITM + LM objective of the `pretrain` weights, the
stage's schedule and precision) for the same number of joint steps at each rate; the masked
runs spend their last `--unmasked-steps` steps with every patch (FLIP's unmasked tuning),
as `pretrain.unmasked_steps` does. The caption warm-up sees every patch in the stage, so it
is trained once (`--warmup-steps`) and every arm starts from its weights. Each arm is then
scored as the stage's report does (`vlp.pretrain_report.zero_shot_retrieval` on the test
split: R@1 both ways and rsum = the sum of R@1/5/10 both ways).

Speed on a shared machine drifts with the other load, so it is measured apart, before the
quality runs: `--speed-rounds` rounds, each giving every rate `--speed-steps` training steps
in turn (same batch, the joint objective, the stage's precision), so every rate sees the
same load; the table shows the median samples/s and CPU-s/step, and each rate's ratio to
the first. The quality runs' own samples/s (median over their masked steps, and over the
whole run, unmasked tuning included) are in the JSON. `--steps 0` measures speed only.

    .venv/bin/python benchmarks/bench_patch_dropout.py [--steps 150] [--unmasked-steps 15]
        [--rates 0 0.5 0.75] [--threads 1] [--out results.json]

The defaults take ~7 CPU-minutes with one thread (13 min wall on a loaded 2-core machine);
results in docs/flip.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _settings(cfg: Any, steps: int) -> Any:
    from vlp.train import TrainSettings

    return TrainSettings.from_config(
        cfg.runtime, cfg.pretrain, seed=cfg.seed, max_steps=steps, checkpoint_every=0
    )


def interleaved_speed(cfg: Any, start: Any, data: Any, args: argparse.Namespace) -> dict:
    """Median samples/s and CPU-s/step of each rate, the rates taking turns (module docstring)."""
    from vlp.models.family import get_family
    from vlp.models.objectives import ObjectiveWeights
    from vlp.models.patch_dropout import set_patch_dropout
    from vlp.train.loop import param_groups
    from vlp.train.settings import resolve_precision

    dataset, collate = data
    p = cfg.pretrain
    batch = collate([dataset[i] for i in range(p.batch_size)])
    weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    dtype = resolve_precision(cfg.runtime.precision, torch.device("cpu"))
    arms = {}
    for rate in args.rates:
        model = copy.deepcopy(start)
        set_patch_dropout(model, rate)
        objective = get_family("fusion").impl().objective(model, weights, cfg.runtime.local_loss)
        opt = torch.optim.AdamW(param_groups(model, p.weight_decay, p.lr), lr=p.lr)
        arms[rate] = (objective.train(), opt, [], [])
    for _ in range(args.speed_rounds):
        for objective, opt, walls, cpus in arms.values():
            for _ in range(args.speed_steps):
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                    loss = objective(**batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
    return {
        rate: {
            "samples_per_s": p.batch_size / statistics.median(walls),
            "cpu_s_per_step": statistics.median(cpus),
        }
        for rate, (_, _, walls, cpus) in arms.items()
    }


def run_arm(cfg: Any, start: Any, data: Any, rate: float, args: argparse.Namespace, tmp: Path):
    """Joint-phase training from a copy of `start` at patch dropout `rate`; speed and scores."""
    from vlp.models.family import get_family
    from vlp.models.objectives import ObjectiveWeights
    from vlp.pretrain_report import zero_shot_retrieval
    from vlp.train import train
    from vlp.train.settings import PatchDropout

    dataset, collate = data
    model = copy.deepcopy(start)
    p = cfg.pretrain
    weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    objective = get_family("fusion").impl().objective(model, weights, cfg.runtime.local_loss)
    unmasked = args.unmasked_steps if rate > 0 else 0
    masking = PatchDropout(rate=rate, unmasked_steps=unmasked) if rate > 0 else None
    cpu0 = time.process_time()
    res = train(
        objective,
        dataset,
        collate,
        _settings(cfg, args.steps),
        tmp / f"joint-{rate}",
        masking=masking,
    )
    cpu = time.process_time() - cpu0
    sps = [h["samples_per_s"] for h in res.history[2:]]  # skip allocator warm-up steps
    masked = sps[: len(sps) - unmasked] if rate > 0 else sps
    scores = zero_shot_retrieval(model, cfg, "test")
    rsum = sum(scores[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
    return {
        "rate": rate,
        "steps": res.steps,
        "unmasked_steps": unmasked,
        "masked_samples_per_s": statistics.median(masked),
        "samples_per_s": statistics.median(sps),
        "cpu_s_per_step": cpu / res.steps,
        "train_s": res.wall_s,
        "loss_last": res.final["loss"],
        "t2i_R@1": scores["t2i_R@1"],
        "i2t_R@1": scores["i2t_R@1"],
        "rsum": rsum,
        "chance_t2i_R@1": scores["chance_t2i_R@1"],
    }


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, Any]:
    """The config (ViT tower, bench data), the warmed-up model and the joint phase's data."""
    from vlp.config import load_config
    from vlp.data.images import image_transforms
    from vlp.data.shapes import generate_dataset
    from vlp.data.torch_data import PairsDataset, make_pretrain_collate
    from vlp.models import build_model, build_tokenizer
    from vlp.models.family import get_family
    from vlp.pretrain import CAPTION_WARMUP_WEIGHTS, corpus
    from vlp.train import train

    cfg = load_config(args.params, args.profile, overrides=args.overrides)
    data_cfg = dataclasses.replace(
        cfg.data, n_pretrain=args.n_pretrain, n_train=16, n_val=4, n_test=args.n_test
    )
    root = tmp / "data"
    generate_dataset(data_cfg, root)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(data_cfg, root=str(root)),
        model=dataclasses.replace(cfg.model, image_tower="vit"),
    )
    transform, augment = image_transforms(cfg)
    tokenizer = build_tokenizer(cfg.model, corpus(root, cfg.pretrain.tokenizer_splits))
    collate = make_pretrain_collate(tokenizer, cfg.model.max_text_length)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer, temperature=cfg.model.temperature)
    if args.warmup_steps > 0:
        firsts = PairsDataset(root, "pretrain", transform, augment, first_caption_only=True)
        objective = (
            get_family("fusion")
            .impl()
            .objective(model, CAPTION_WARMUP_WEIGHTS, cfg.runtime.local_loss)
        )
        train(objective, firsts, collate, _settings(cfg, args.warmup_steps), tmp / "warm")
    pairs = PairsDataset(root, "pretrain", transform, augment)
    return cfg, model, (pairs, collate)


def print_table(cfg: Any, args: argparse.Namespace, speed: dict, rows: list[dict]) -> None:
    """Speed (interleaved) and, when the quality runs ran, their losses and retrieval."""
    m, base = cfg.model, speed[args.rates[0]]
    print(
        f"\nViT tower {m.hidden_size}x{m.num_image_layers} layers, patch {m.patch_size}, "
        f"{cfg.data.image_size}px ({(cfg.data.image_size // m.patch_size) ** 2} patches), "
        f"batch {cfg.pretrain.batch_size}, {torch.get_num_threads()} threads; speed: "
        f"{args.speed_rounds} rounds x {args.speed_steps} steps per rate"
    )
    quality = {r["rate"]: r for r in rows}
    if rows:
        print(
            f"quality: {args.steps} joint steps per rate after {args.warmup_steps} warm-up "
            f"steps; R@ on {args.n_test} test images (chance R@1 "
            f"{rows[0]['chance_t2i_R@1']:.1f}), rsum = R@1+5+10 both ways"
        )
    print(
        f"{'rate':>5} {'samples/s':>9} {'x':>5} {'CPU-s/step':>10} {'x':>5} "
        f"{'unmasked':>8} {'loss':>6} {'t2i R@1':>7} {'i2t R@1':>7} {'rsum':>6}"
    )
    for rate, sp in speed.items():
        r = quality.get(rate)
        tail = (
            f"{r['unmasked_steps']:8d} {r['loss_last']:6.3f} {r['t2i_R@1']:7.1f} "
            f"{r['i2t_R@1']:7.1f} {r['rsum']:6.1f}"
            if r
            else ""
        )
        print(
            f"{rate:5.2f} {sp['samples_per_s']:9.1f} "
            f"{sp['samples_per_s'] / base['samples_per_s']:5.2f} {sp['cpu_s_per_step']:10.3f} "
            f"{base['cpu_s_per_step'] / sp['cpu_s_per_step']:5.2f} {tail}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    ap.add_argument("--steps", type=int, default=150, help="joint steps of every arm")
    ap.add_argument("--unmasked-steps", type=int, default=15, help="of the masked arms")
    ap.add_argument("--warmup-steps", type=int, default=250, help="caption warm-up, shared")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--speed-steps", type=int, default=3, help="steps per rate per round")
    ap.add_argument("--n-pretrain", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_patch_dropout."))
    t0 = time.perf_counter()
    cfg, start, data = prepare(args, tmp)
    print(f"data + warm-up ({args.warmup_steps} steps): {time.perf_counter() - t0:.0f}s")
    speed = interleaved_speed(cfg, start, data, args)
    rows = [run_arm(cfg, start, data, rate, args, tmp) for rate in args.rates if args.steps > 0]
    for row in rows:
        print(json.dumps(row), flush=True)
    print_table(cfg, args, speed, rows)
    if args.out:
        result = {"args": vars(args), "speed": speed, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
