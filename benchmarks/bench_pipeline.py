"""Time `dvc repro` stage by stage and print the quality numbers the pipeline reports.

Usage: .venv/bin/python benchmarks/bench_pipeline.py [--force] [--out timings.json] [TARGET ...]

Runs `dvc repro` (with `--force`: every stage, even if up to date) in the current
repository, timestamps each "Running stage" line DVC prints, and reports each stage's wall
time (until the next stage starts; DVC's own hashing and lock writing included), the total,
and then the finetuning metrics from metrics/<task>.json: primary metric, pretrained vs
scratch, and the bars of the default profile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
BARS = {  # task -> (metric key in the pretrained block, bar); recall and accuracy in percent
    "retrieval": ("mean_R@1", 80.0),
    "captioning": ("CIDEr", 1.5),
    "vqa": ("overall", 80.0),
}


def time_repro(targets: list[str], force: bool) -> tuple[list[tuple[str, float]], float, int]:
    """([(stage, seconds)], total seconds, exit code) of one `dvc repro` run."""
    cmd = ["dvc", "repro", *(["--force"] if force else []), *targets]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    starts: list[tuple[str, float]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        now = time.perf_counter() - t0
        if m := RUNNING.search(line):
            starts.append((m.group(1), now))
        elif m := SKIPPED.search(line):
            starts.append((f"{m.group(1)} (skipped)", now))
    rc = proc.wait()
    total = time.perf_counter() - t0
    ends = [t for _, t in starts[1:]] + [total]
    return [(name, end - t) for (name, t), end in zip(starts, ends, strict=True)], total, rc


def quality(metrics_dir: Path) -> list[str]:
    """One line per task: its bar metric pretrained vs scratch, and whether the bars hold."""
    lines = []
    for task, (key, bar) in BARS.items():
        path = metrics_dir / f"{task}.json"
        if not path.exists():
            lines.append(f"{task:11s} (no {path})")
            continue
        doc = json.loads(path.read_text())
        pre = doc["pretrained"].get(key, float("nan"))
        scratch = doc.get("scratch", {}).get(key, float("nan"))
        verdict = "meets bar" if pre >= bar else "BELOW bar"
        wins = "pretrained wins" if pre > scratch else "scratch not beaten"
        lines.append(
            f"{task:11s} {key} pretrained {pre:8.3f}  scratch {scratch:8.3f}  "
            f"(bar {bar}: {verdict}; {wins})"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help="dvc repro targets (default: whole pipeline)")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--out", default=None, help="also write the timings as JSON here")
    p.add_argument("--metrics-dir", default="metrics")
    args = p.parse_args()

    stages, total, rc = time_repro(args.targets, args.force)
    print("\nstage timings (wall seconds)")
    for name, secs in stages:
        print(f"  {name:32s} {secs:8.1f}")
    print(f"  {'total':32s} {total:8.1f}  ({total / 60:.1f} min)")
    print("\nfinetuning quality (metrics/<task>.json)")
    for line in quality(Path(args.metrics_dir)):
        print("  " + line)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"stages": dict(stages), "total_s": total, "rc": rc}, indent=2) + "\n"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
