"""Where bf16 loses on a CPU: torch.profiler of the default pretraining step, fp32 vs bf16.

Profiles a few optimizer steps of the default pipeline's model (params.yaml `model`,
`pretrain.batch_size`, ITC + ITM + LM) in each precision and prints, per precision, the
CPU time by operator group: matmuls (mm/addmm/bmm), convolutions (forward and backward),
copies (`aten::copy_`: layout copies and, under bf16 autocast, dtype conversions), the
normalisation/activation/softmax ops, the optimizer step, and the rest; then the bf16 copies
by tensor shape, which shows what autocast converts.

    .venv/bin/python benchmarks/bench_bf16_profile.py [--steps 3] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "copy (layout + dtype)": ("aten::copy_",),
    "norm/act/softmax": (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::native_batch_norm",
        "aten::native_batch_norm_backward",
        "aten::gelu",
        "aten::gelu_backward",
        "aten::_softmax",
        "aten::_softmax_backward_data",
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
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

    cfg = load_config("params.yaml")
    bs = cfg.pretrain.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench_bf16."))
    data_cfg = dataclasses.replace(cfg.data, n_pretrain=bs, n_train=16, n_val=4, n_test=4)
    generate_dataset(data_cfg, tmp / "data")
    dataset = PairsDataset(tmp / "data", "pretrain", *image_transforms(cfg))
    tokenizer = build_tokenizer(cfg.model, corpus(tmp / "data", cfg.pretrain.tokenizer_splits))
    batch = make_pretrain_collate(tokenizer, cfg.model.max_text_length)(
        [dataset[i] for i in range(bs)]
    )
    p = cfg.pretrain
    weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    steps = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        objective = VLPObjective(build_model(cfg.model, tokenizer, 0.07), weights, True)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)

        def step(dtype=dtype, objective=objective, optimizer=optimizer) -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = objective(**batch)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            step()
        steps[name] = step
    # the precisions alternate, and each keeps its least-disturbed round: other jobs on a
    # shared machine slow whichever runs while they do
    totals: dict[str, tuple[float, dict[str, float]]] = {}
    copies: list = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.steps):
                    step()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
            if name in totals and totals[name][0] <= total:
                continue
            by_group: dict[str, float] = defaultdict(float)
            for e in events:
                group = next((g for g, ops in GROUPS.items() if e.key in ops), None)
                if group is None:
                    optim = "Optimizer" in e.key or e.key.startswith("aten::_foreach")
                    group = "optimizer" if optim else "rest"
                by_group[group] += e.self_cpu_time_total / args.steps / 1e3
            totals[name] = (total, by_group)
            if name == "bf16":
                shaped = prof.key_averages(group_by_input_shape=True)
                copies = sorted(
                    (e for e in shaped if e.key == "aten::copy_"),
                    key=lambda e: -e.self_cpu_time_total,
                )
    (t32, g32), (t16, g16) = totals["fp32"], totals["bf16"]
    print(f"per step, ms of CPU time (batch {bs}, {torch.get_num_threads()} threads)")
    print(f"{'group':24s} {'fp32':>8s} {'bf16':>8s} {'fp32/bf16':>9s}")
    for group in [*GROUPS, "optimizer", "rest"]:
        a, b = g32.get(group, 0.0), g16.get(group, 0.0)
        print(f"{group:24s} {a:8.1f} {b:8.1f} {a / b if b else float('nan'):8.2f}x")
    print(f"{'total':24s} {t32:8.1f} {t16:8.1f} {t32 / t16:8.2f}x")
    print("bf16 copies by shape (ms per step, calls per step):")
    for e in copies[:8]:
        shape = e.input_shapes[0] if e.input_shapes else []
        print(
            f"  {e.self_cpu_time_total / args.steps / 1e3:7.1f} ms "
            f"{e.count / args.steps:6.1f}  {shape}"
        )


if __name__ == "__main__":
    main()
