"""Does the recipe's first step pay? VLP pretraining of a ViT tower from MAE vs from random.

Runs the stages with `vlp` itself, every output in a work folder (`--work`, a fresh
temporary one by default) and its own MLflow store, on the dataset of `data.root`:

1. `vlp pretrain-vision`: MAE on the images of `pretrain_vision.splits`.
2. `vlp pretrain` three times with `model.image_tower: vit` at the VLP budget of params.yaml
   (or `--pretrain-epochs`): from random init, from the MAE encoder, and from the MAE
   encoder with `--fraction` (0.6) of the steps of both phases (caption warm-up and joint).
3. `vlp probe` after each (linear probes of shape and colour on frozen image features).
4. With `--tasks`, every task finetuned from each full-budget model and evaluated.

Prints a table and writes it as JSON (`--out`). The goal it checks: MAE-initialised VLP at
`--fraction` of the steps reaches random init's final zero-shot R@1 (mean of i2t and t2i).

    .venv/bin/python benchmarks/bench_mae_ablation.py --pretrain-epochs 1 --tasks retrieval
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlp.config import load_config

TASKS = ("retrieval", "captioning", "vqa")
PRIMARY = {"retrieval": "mean_R@1", "captioning": "CIDEr", "vqa": "overall"}


def vlp(sets: list[str], *args: str) -> float:
    """Run `vlp --set ... ARGS`; seconds it took. Exits on a failed command."""
    cmd = [sys.executable, "-m", "vlp.cli"]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def variant_sets(work: Path, name: str) -> list[str]:
    """Every output folder of a variant under work/name, and its own tracking store."""
    root = work / name
    return [
        f"runtime.metrics_dir={root / 'metrics'}",
        f"runtime.plots_dir={root / 'plots'}",
        f"pretrain.out_dir={root / 'pretrained'}",
        f"finetune.init_dir={root / 'pretrained'}",
        f"finetune.out_dir={root / 'finetuned'}",
        f"evaluate.models_dir={root / 'finetuned'}",
        f"evaluate.results_dir={root / 'results'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_root={work / 'mlartifacts'}",
        "finetune.ablation=false",
        "model.image_tower=vit",
    ]


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def zero_shot_r1(metrics: dict[str, Any]) -> float:
    """Mean of zero-shot i2t and t2i R@1 (percent) from metrics/pretrain.json."""
    return (metrics["zeroshot_i2t_R@1"] + metrics["zeroshot_t2i_R@1"]) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="output folder (default: a temp one)")
    p.add_argument(
        "--pretrain-epochs", type=int, default=None, help="VLP epochs (params: pretrain.epochs)"
    )
    p.add_argument(
        "--mae-steps", type=int, default=None, help="MAE steps (params: pretrain_vision.max_steps)"
    )
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value, every stage")
    p.add_argument(
        "--fraction", type=float, default=0.6, help="share of the VLP steps of the short MAE run"
    )
    p.add_argument(
        "--tasks", nargs="*", default=[], choices=TASKS, help="finetune and evaluate these"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mae_ablation.json"))
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="vlp-mae-ablation-"))
    cfg = load_config("params.yaml")
    common = list(a.sets)
    if a.pretrain_epochs is not None:
        common.append(f"pretrain.epochs={a.pretrain_epochs}")
    mae_sets = [*variant_sets(work, "mae"), *common, "pretrain_vision.enabled=true"]
    mae_sets.append(f"pretrain_vision.out_dir={work / 'mae' / 'pretrained_vision'}")
    if a.mae_steps is not None:
        mae_sets.append(f"pretrain_vision.max_steps={a.mae_steps}")
    seconds = {"pretrain_vision": vlp(mae_sets, "pretrain-vision")}
    mae_metrics = read(work / "mae" / "metrics" / "pretrain_vision.json")

    variants = {"random": [*variant_sets(work, "random"), *common], "mae": mae_sets}
    rows: dict[str, dict[str, Any]] = {}
    for name, sets in variants.items():
        seconds[f"pretrain_{name}"] = vlp(sets, "pretrain")
        vlp(sets, "probe")
        rows[name] = {
            "pretrain": read(work / name / "metrics" / "pretrain.json"),
            "probe": read(work / name / "metrics" / "probe.json"),
        }
    full = rows["mae"]["pretrain"]
    short = [
        *variant_sets(work, "mae_short"),
        *common,
        "pretrain_vision.enabled=true",
        f"pretrain_vision.out_dir={work / 'mae' / 'pretrained_vision'}",
        f"pretrain.max_steps={math.ceil(a.fraction * full['steps'])}",
        f"pretrain.caption_warmup_steps={math.ceil(a.fraction * cfg.pretrain.caption_warmup_steps)}",
    ]
    seconds["pretrain_mae_short"] = vlp(short, "pretrain")
    rows["mae_short"] = {"pretrain": read(work / "mae_short" / "metrics" / "pretrain.json")}

    for task in a.tasks:
        for name in ("random", "mae"):
            vlp(variants[name], "finetune", task, "--init", "pretrained")
            vlp(variants[name], "evaluate", task)
            doc = read(work / name / "metrics" / f"{task}.json")
            rows[name][task] = doc["pretrained"][PRIMARY[task]]

    summary = {
        "work": str(work),
        "mae": {k: mae_metrics[k] for k in mae_metrics if not k.startswith("wall")},
        "seconds": seconds,
        "fraction": a.fraction,
        "rows": {
            name: {
                "steps": r["pretrain"]["steps"],
                "caption_warmup_steps": r["pretrain"].get("caption_warmup_steps", 0),
                "zeroshot_R@1": zero_shot_r1(r["pretrain"]),
                "zeroshot_rsum": r["pretrain"]["zeroshot_rsum"],
                **({"probe": r["probe"]} if "probe" in r else {}),
                **{t: r[t] for t in a.tasks if t in r},
            }
            for name, r in rows.items()
        },
    }
    goal = summary["rows"]["mae_short"]["zeroshot_R@1"] >= summary["rows"]["random"]["zeroshot_R@1"]
    summary["goal_mae_short_reaches_random"] = goal
    print(
        f"{'variant':<10} {'steps':>6} {'zs R@1':>7} {'rsum':>7}  "
        + " ".join(f"{t:>10}" for t in a.tasks)
    )
    for name, r in summary["rows"].items():
        cells = " ".join(f"{r.get(t, float('nan')):>10.2f}" for t in a.tasks)
        print(
            f"{name:<10} {r['steps']:>6} {r['zeroshot_R@1']:>7.2f} {r['zeroshot_rsum']:>7.1f}  {cells}"
        )
    print(f"MAE at {a.fraction:.0%} of the steps reaches random init's R@1: {goal}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
