"""Data benchmarks: shapes generation speed, dataset size on disk, `vlp validate` time.

Run: .venv/bin/python benchmarks/bench_data.py [--profile default] [--repeats 2]
Generates into a temp dir (the repo's data/ is untouched) and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlp.config import load_config
from vlp.data.shapes import generate_dataset

REPO = Path(__file__).resolve().parents[1]


def _size_on_disk(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--repeats", type=int, default=2, help="generation runs (best is reported)")
    args = p.parse_args()
    cfg = load_config(REPO / "params.yaml", profile=args.profile)
    d = cfg.data
    n_images = d.n_pretrain + d.n_train + d.n_val + d.n_test
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shapes"
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            generate_dataset(d, out)
            times.append(time.perf_counter() - t0)
        n_files, n_bytes = _size_on_disk(out)
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "vlp.cli",
                "--params",
                str(REPO / "params.yaml"),
                "--profile",
                args.profile,
                "validate",
                "--data",
                str(out),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        validate_s = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"vlp validate failed:\n{done.stderr}")
        t0 = time.perf_counter()
        import great_expectations  # noqa: F401  (import cost, reported apart)

        gx_import_s = time.perf_counter() - t0
        from vlp.data.validation import validate_dataset

        t0 = time.perf_counter()
        validate_dataset(out, cfg.validate)
        validate_inproc_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "profile": args.profile,
                "images": n_images,
                "image_size": d.image_size,
                "generate_s_best": round(min(times), 3),
                "generate_images_per_s": round(n_images / min(times), 1),
                "files": n_files,
                "size_on_disk_mb": round(n_bytes / 2**20, 2),
                "vlp_validate_cli_s": round(validate_s, 2),
                "gx_import_s": round(gx_import_s, 2),
                "validate_in_process_s": round(validate_inproc_s, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
