"""Image loading benchmark: decode + transform throughput at 224 px, and memory as data grows.

Run: .venv/bin/python benchmarks/bench_images.py [--photos 300] [--small 1000 10000]

Writes synthetic JPEG photos of mixed sizes and aspect ratios (200-1400 px a side) into a
temp dir and measures:
- images/s per core of `ImagesDataset` with the `shorter_side_crop` transform at 224 px
  through a DataLoader with 0, 1 and 2 workers, against a plain single-thread loop of PIL
  open + resize to 224x224 of the same files (ratio > 1: the dataset is faster per core);
- peak resident memory of a fresh process that iterates a dataset of small JPEGs twice,
  at each `--small` size (ratio 10k / 1k near 1: memory does not grow with the dataset).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vlp.data.images import ImageTransform
from vlp.data.manifest import IMAGES_DIR, PAIRS_FILE, write_manifest

SIZE = 224
HALF = (0.5, 0.5, 0.5)


def make_photos(root: Path, n: int, lo: int, hi: int, seed: int = 0) -> Path:
    """A dataset dir of `n` JPEG 'photos' (smooth noise, sides in [lo, hi]) in split test."""
    rng = np.random.default_rng(seed)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(lo, hi + 1, size=2))
        coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        rel = f"{IMAGES_DIR}/{i:06d}.jpg"
        img.save(root / rel, quality=90)
        rows.append({"caption_id": i, "image_id": i, "image_path": rel, "caption": "a photo"})
    write_manifest(pd.DataFrame(rows).assign(split="test"), root / PAIRS_FILE)
    return root


def plain_pil(paths: list[Path]) -> float:
    """images/s of a single-thread PIL open + RGB + resize to SIZE x SIZE."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return len(paths) / (time.perf_counter() - t0)


def through_dataset(data: Path, workers: int, passes: int = 1) -> float:
    """images/s of ImagesDataset (shorter_side_crop at SIZE) through a DataLoader."""
    from torch.utils.data import DataLoader

    from vlp.data.torch_data import ImagesDataset, collate

    ds = ImagesDataset(data, "test", ImageTransform(SIZE, "shorter_side_crop", HALF, HALF))
    loader = DataLoader(
        ds,
        batch_size=32,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
    )
    next(iter(loader))  # start the workers outside the clock
    t0 = time.perf_counter()
    n = 0
    for _ in range(passes):
        for batch in loader:
            n += len(batch["image_id"])
    return n / (time.perf_counter() - t0)


def _peak_rss(data: Path) -> int:
    """Peak RSS (bytes) of a fresh process that iterates the dataset at `data` twice."""
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from benchmarks.bench_images import through_dataset\n"
        "through_dataset(Path(sys.argv[1]), 0, passes=2)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(data)], check=True, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=300, help="photos for the throughput runs")
    p.add_argument("--small", type=int, nargs=2, default=[1000, 10000], help="memory sizes")
    args = p.parse_args()
    report: dict[str, object] = {"size": SIZE}
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", args.photos, 200, 1400)
        paths = sorted((photos / IMAGES_DIR).glob("*.jpg"))
        plain_pil(paths[:20])  # warm the page cache
        baseline = plain_pil(paths)
        report["plain_pil_images_per_s"] = round(baseline, 1)
        for workers in (0, 1, 2):
            ips = through_dataset(photos, workers)
            per_core = ips / max(workers, 1)
            report[f"workers_{workers}"] = {
                "images_per_s": round(ips, 1),
                "images_per_s_per_core": round(per_core, 1),
                "per_core_vs_plain_pil": round(per_core / baseline, 3),
            }
        rss = {}
        for n in args.small:
            rss[n] = _peak_rss(make_photos(Path(tmp) / f"small{n}", n, 64, 160, seed=n))
        lo, hi = args.small
        report["peak_rss_mb"] = {str(n): round(v / 2**20, 1) for n, v in rss.items()}
        report[f"rss_ratio_{hi}_vs_{lo}"] = round(rss[hi] / rss[lo], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
