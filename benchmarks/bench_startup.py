"""Start-up of the light `vlp` commands: this tree against another, in one run.

Run: .venv/bin/python benchmarks/bench_startup.py --baseline /path/to/other/checkout [--repeats 5]

Each command runs in a fresh interpreter with the tree on PYTHONPATH, from the tree's root
(where its params.yaml is), the two trees' runs interleaved so that both see the same load:
`vlp --help`, `vlp eval retrieval` on a 10 x 50 similarity matrix, `vlp validate --help`.
Printed per command and tree: the median wall and CPU (user + system) seconds and the peak
resident memory over the repeats, and the baseline / this ratios. On a busy machine wall
time swings with the load; CPU time and memory do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TREE = Path(__file__).resolve().parents[1]


def commands(similarity: Path) -> dict[str, list[str]]:
    """Name -> `vlp` arguments of each command measured."""
    return {
        "vlp --help": ["--help"],
        "vlp eval retrieval (10 x 50)": ["eval", "retrieval", "--similarity", str(similarity)],
        "vlp validate --help": ["validate", "--help"],
    }


def run_once(tree: Path, args: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of `python -m vlp.cli ARGS` with `tree` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlp.cli", *args],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: vlp {' '.join(args)} exited {proc.returncode}: {err.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def check_tree(tree: Path) -> None:
    """SystemExit unless `vlp` imports from `tree` itself when it is on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    found = subprocess.run(
        [sys.executable, "-c", "import vlp; print(vlp.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: `import vlp` loads {found}, not this tree")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout's root")
    ap.add_argument("--repeats", type=int, default=5, help="runs per command and tree")
    args = ap.parse_args()
    trees = {"this": TREE, "baseline": args.baseline}
    for tree in trees.values():
        check_tree(tree)
    with tempfile.TemporaryDirectory() as tmp:
        similarity = Path(tmp) / "similarity.npy"
        np.save(similarity, np.random.default_rng(0).random((10, 50), dtype=np.float32))
        print(f"{'command':30} {'tree':9} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9}")
        for name, words in commands(similarity).items():
            samples: dict[str, list[tuple[float, float, float]]] = {t: [] for t in trees}
            run_once(TREE, words)  # warm the file cache for both trees alike
            run_once(args.baseline, words)
            for _ in range(args.repeats):
                for label, tree in trees.items():
                    samples[label].append(run_once(tree, words))
            stats = {
                label: (
                    statistics.median(s[0] for s in runs),
                    statistics.median(s[1] for s in runs),
                    max(s[2] for s in runs),
                )
                for label, runs in samples.items()
            }
            for label, (wall, cpu, rss) in stats.items():
                print(f"{name:30} {label:9} {wall:7.2f} {cpu:7.2f} {rss:9.0f}")
            base, this = stats["baseline"], stats["this"]
            print(
                f"{name:30} {'ratio':9} {base[0] / this[0]:6.1f}x {base[1] / this[1]:6.1f}x "
                f"{base[2] / this[2]:8.1f}x  (baseline / this)"
            )


if __name__ == "__main__":
    main()
