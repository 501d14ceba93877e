"""Image loading benchmark: decode + transform throughput at 224 px, and memory as data grows.

Run: .venv/bin/python benchmarks/bench_images.py [--photos 300] [--small 1000 10000]

Writes synthetic JPEG photos of mixed sizes and aspect ratios (200-1400 px a side) into a
temp dir and measures:
- images/s per core of `ImagesDataset` with the `shorter_side_crop` transform at 224 px
  through a DataLoader with 0, 1 and 2 workers, against a plain single-thread loop of PIL
  open + resize to 224x224 of the same files (ratio > 1: the dataset is faster per core);
- peak resident memory of a fresh process that iterates a dataset of small JPEGs twice,
  at each `--small` size (ratio 10k / 1k near 1: memory does not grow with the dataset);
- reduced-scale JPEG decoding (`images.fast_decode`, `vlp.data.decode`) on COCO-sized
  (640x480) and 12-megapixel (4000x3000) JPEGs, one process: plain PIL open + resize,
  plain PIL with `Image.draft` + resize, and the dataset with and without reduced decoding
  (medians of `--repeats` runs, each ratio within one run), and the pixel difference it
  makes under the transform above and under a CLIP image processor (`ProcessorTransform`).
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
from vlp.data.processors import ProcessorTransform

SIZE = 224
HALF = (0.5, 0.5, 0.5)


def make_photos(
    root: Path, n: int, lo: int, hi: int, seed: int = 0, wh: tuple[int, int] | None = None
) -> Path:
    """A dataset dir of `n` JPEG 'photos' (smooth noise, sides in [lo, hi], or all `wh`)."""
    rng = np.random.default_rng(seed)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = wh if wh is not None else (int(x) for x in rng.integers(lo, hi + 1, size=2))
        coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        rel = f"{IMAGES_DIR}/{i:06d}.jpg"
        img.save(root / rel, quality=90)
        rows.append({"caption_id": i, "image_id": i, "image_path": rel, "caption": "a photo"})
    write_manifest(pd.DataFrame(rows).assign(split="test"), root / PAIRS_FILE)
    return root


def plain_pil(paths: list[Path], draft: bool = False) -> float:
    """images/s of a single-thread PIL open + RGB + resize to SIZE x SIZE (`draft`: reduced)."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            if draft:
                img.draft("RGB", (SIZE, SIZE))
            img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return len(paths) / (time.perf_counter() - t0)


def dataset_rate(data: Path, transform, fast: bool) -> float:
    """images/s of one pass of a fresh ImagesDataset in this process (no DataLoader workers)."""
    from vlp.data.torch_data import ImagesDataset

    ds = ImagesDataset(data, "test", transform, fast_jpeg=fast)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t0)


def pixel_difference(paths: list[Path], transform) -> dict[str, float]:
    """Mean and max |reduced - exact| of the model's pixels, in 8-bit steps of the input."""
    from functools import partial

    from vlp.data.images import open_fitted
    from vlp.data.manifest import open_image

    diffs = []
    for p in paths:
        exact, fast = (
            np.asarray(open_fitted(partial(open_image, p), transform, f), dtype=float)
            for f in (False, True)
        )
        diffs.append(np.abs(exact - fast))
    d = np.stack(diffs)
    return {"mean": round(float(d.mean()), 3), "max": float(d.max())}


def decode_study(tmp: Path, repeats: int) -> dict[str, object]:
    """Reduced-scale decoding against full decoding, per core, at two photo sizes."""
    from transformers import CLIPImageProcessorPil

    transform = ImageTransform(SIZE, "shorter_side_crop", HALF, HALF)
    clip = ProcessorTransform(CLIPImageProcessorPil(), "CLIP")  # shortest edge 224, crop 224
    transform.fit(Image.new("RGB", (8, 8)))  # build the processor outside the clock
    out: dict[str, object] = {}
    for name, wh, n in (("coco_640x480", (640, 480), 150), ("12mp_4000x3000", (4000, 3000), 8)):
        data = make_photos(tmp / name, n, 0, 0, wh=wh)
        paths = sorted((data / IMAGES_DIR).glob("*.jpg"))
        plain_pil(paths[:4])  # warm the page cache
        runs = []
        for _ in range(repeats):
            runs.append(
                {
                    "plain_pil": plain_pil(paths),
                    "plain_pil_draft": plain_pil(paths, draft=True),
                    "dataset_exact": dataset_rate(data, transform, fast=False),
                    "dataset_fast_decode": dataset_rate(data, transform, fast=True),
                }
            )
        ratios = {
            f"{k}_vs_plain_pil": float(np.median([r[k] / r["plain_pil"] for r in runs]))
            for k in ("plain_pil_draft", "dataset_exact", "dataset_fast_decode")
        }
        out[name] = {
            "images": n,
            **{
                f"{k}_images_per_s": round(float(np.median([r[k] for r in runs])), 1)
                for k in runs[0]
            },
            **{k: round(v, 2) for k, v in ratios.items()},
            "fast_over_exact": round(
                float(np.median([r["dataset_fast_decode"] / r["dataset_exact"] for r in runs])), 2
            ),
            "pixel_difference": pixel_difference(paths[:8], transform),
            "pixel_difference_clip_processor": pixel_difference(paths[:8], clip),
        }
    return out


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
    p.add_argument("--repeats", type=int, default=3, help="runs of the decode study (medians)")
    p.add_argument("--decode-only", action="store_true", help="only the decode study")
    args = p.parse_args()
    report: dict[str, object] = {"size": SIZE}
    with tempfile.TemporaryDirectory() as tmp:
        report["fast_decode"] = decode_study(Path(tmp), args.repeats)
        if args.decode_only:
            print(json.dumps(report, indent=2))
            return
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
