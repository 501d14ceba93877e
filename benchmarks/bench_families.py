"""Fusion vs encoder-decoder (ViT + GPT-2) vs t5 (image tokens into T5) at one budget.

Runs the pipeline's stages with `vlp` itself for each family, every output in a work folder
(`--work`) with its own MLflow store, on a shapes dataset generated there:

1. `vlp generate --out WORK/data` (the data params: params.yaml's, or the profile's).
2. Per family (`model.family`, with `model.image_tower: vit` for all three, since the
   encoder-decoder's GPT-2 reads a token sequence and refuses the CNN tower):
   `vlp pretrain`, then `vlp finetune captioning|vqa --init pretrained|scratch`
   (retrieval too for the families that do it: fusion), then `vlp evaluate` per task.

Every family gets the same budget: the params' (or `--set`'s) pretraining steps, caption
warm-up, batch sizes and finetune epochs. `--reference` reads the default pipeline's scores
(fusion, CNN tower) from a metrics folder as a reference row; nothing is rerun for it.
Prints a table and writes the scores, parameter counts and wall times as JSON (`--out`).

    .venv/bin/python benchmarks/bench_families.py --work /tmp/families --profile smoke
    .venv/bin/python benchmarks/bench_families.py --work /tmp/families \\
        --set pretrain.epochs=1 --set finetune.vqa.epochs=4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

FAMILIES = ("fusion", "encoder-decoder", "t5")
TASKS = ("retrieval", "captioning", "vqa")
INITS = ("pretrained", "scratch")
# the scores the table keeps, per task (keys of metrics/<task>.json's init blocks)
SCORES = {
    "retrieval": ("mean_R@1", "i2t_R@1", "t2i_R@1"),
    "captioning": ("Bleu_4", "CIDEr", "ROUGE_L"),
    "vqa": ("overall",),
}


class StageFailed(RuntimeError):
    """A `vlp` command exited non-zero."""


def vlp(pre: list[str], sets: list[str], *args: str, env: dict[str, str] | None = None) -> float:
    """Run `vlp PRE --set ... ARGS`; seconds it took. StageFailed on a failed command."""
    cmd = [sys.executable, "-m", "vlp.cli", *pre]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    print("+ vlp", *args, flush=True)
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StageFailed(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  {' '.join(args)}: {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def family_sets(work: Path, family: str, scratch: bool) -> list[str]:
    """The family and its tower, every output folder and its tracking store under work/family."""
    root = work / family
    return [
        f"model.family={family}",
        "model.image_tower=vit",
        f"data.root={work / 'data'}",
        f"runtime.metrics_dir={root / 'metrics'}",
        f"runtime.plots_dir={root / 'plots'}",
        f"pretrain.out_dir={root / 'pretrained'}",
        f"finetune.init_dir={root / 'pretrained'}",
        f"finetune.out_dir={root / 'finetuned'}",
        f"evaluate.models_dir={root / 'finetuned'}",
        f"evaluate.results_dir={root / 'results'}",
        f"validate.report_dir={root / 'validation'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_root={root / 'mlartifacts'}",
        f"finetune.ablation={'true' if scratch else 'false'}",
    ]


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def num_parameters(model_dir: Path) -> int:
    """Parameters of the model a vlp model directory holds."""
    from vlp.models.family import load_model

    model = load_model(model_dir).model
    return sum(p.numel() for p in model.parameters())


def task_scores(doc: dict[str, Any], task: str, inits: tuple[str, ...]) -> dict[str, Any]:
    """{init: {score: value}} of one metrics/<task>.json."""
    return {i: {k: doc[i][k] for k in SCORES[task] if k in doc[i]} for i in inits if i in doc}


def run_family(
    pre: list[str], sets: list[str], work: Path, family: str, inits: tuple[str, ...], threads: int
) -> dict[str, Any]:
    """Pretrain, finetune and evaluate one family; its scores and seconds per stage. A failed
    stage ends the family's run: the row keeps what finished and the error."""
    from vlp.models.family import FAMILIES as REGISTRY

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    tasks = [t for t in TASKS if t in REGISTRY[family].tasks]
    root = work / family
    seconds: dict[str, float] = {}
    row: dict[str, Any] = {"tasks": {}, "not_applicable": [t for t in TASKS if t not in tasks]}
    row["seconds"] = seconds
    try:
        seconds["pretrain"] = vlp(pre, sets, "pretrain", env=env)
        row["pretrain"] = read(root / "metrics" / "pretrain.json")
        row["num_parameters"] = num_parameters(root / "pretrained")
        for task in tasks:
            for init in inits:
                seconds[f"finetune_{task}_{init}"] = vlp(
                    pre, sets, "finetune", task, "--init", init, env=env
                )
            seconds[f"evaluate_{task}"] = vlp(pre, sets, "evaluate", task, env=env)
            row["tasks"][task] = task_scores(read(root / "metrics" / f"{task}.json"), task, inits)
    except StageFailed as e:
        print(f"{family}: {e}", file=sys.stderr, flush=True)
        row["error"] = str(e)
    return row


def reference_row(metrics: Path, model_dir: Path | None) -> dict[str, Any]:
    """The default pipeline's scores (fusion family, CNN tower) from its metrics folder, and
    the parameters of its pretrained model (`model_dir`, when given)."""
    pre = read(metrics / "pretrain.json")
    return {
        **({"num_parameters": num_parameters(model_dir)} if model_dir else {}),
        "source": str(metrics),
        "pretrain": pre,
        "tasks": {t: task_scores(read(metrics / f"{t}.json"), t, INITS) for t in TASKS},
        "not_applicable": [],
        "seconds": {"pretrain": pre.get("wall_s")},
    }


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    cols = [("captioning", "Bleu_4"), ("captioning", "CIDEr"), ("vqa", "overall")]
    cols.append(("retrieval", "mean_R@1"))
    head = " ".join(f"{t[:4]}:{k:>8}" for t, k in cols)
    print(f"{'family':<22} {'init':<10} {head} {'pretrain_s':>10} {'params':>10}")
    for name, row in rows.items():
        for init in INITS:
            cells = []
            for task, key in cols:
                v = row["tasks"].get(task, {}).get(init, {}).get(key)
                cells.append(f"{v:>13.3f}" if v is not None else f"{'n/a':>13}")
            secs = row["seconds"].get("pretrain") or float("nan")
            n = row.get("num_parameters", 0)
            print(f"{name:<22} {init:<10} {' '.join(cells)} {secs:>10.0f} {n:>10}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="output folder (data, models, runs)")
    p.add_argument("--profile", default=None, help="a profiles.yaml overlay, e.g. smoke")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value, every stage")
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--inits", nargs="*", default=list(INITS), choices=INITS)
    p.add_argument(
        "--reference", type=Path, default=Path("metrics"), help="default pipeline's metrics"
    )
    p.add_argument(
        "--reference-model", type=Path, default=None, help="its pretrained model directory"
    )
    p.add_argument("--jobs", type=int, default=1, help="families run at once")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per stage; 0: unset")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/families.json"))
    a = p.parse_args()
    work = a.work.resolve()
    pre = ["--profile", a.profile] if a.profile else []
    inits = tuple(a.inits)
    seconds = {}
    if not (work / "data" / "pairs.parquet").exists():
        seconds["generate"] = vlp(pre, a.sets, "generate", "--out", str(work / "data"))
    rows: dict[str, dict[str, Any]] = {}
    if a.reference and (a.reference / "pretrain.json").exists():
        rows["fusion-cnn (default pipeline)"] = reference_row(a.reference, a.reference_model)
    summary: dict[str, Any] = {
        "work": str(work),
        "profile": a.profile,
        "sets": a.sets,
        "inits": list(inits),
        "seconds": seconds,
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {
            pool.submit(
                run_family,
                pre,
                [*family_sets(work, family, "scratch" in inits), *a.sets],
                work,
                family,
                inits,
                a.threads,
            ): family
            for family in a.families
        }
        for future in as_completed(futures):
            rows[f"{futures[future]}-vit"] = future.result()
            a.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
