"""Shard reading benchmark: images/s read and decoded from webdataset shards vs Parquet + files.

Run: .venv/bin/python benchmarks/bench_shards.py [--photos 300] [--workers 0 1 2]

Writes synthetic JPEG photos of mixed sizes (200-1400 px a side, as bench_images.py) into a
temp dataset directory, shards it with `vlp shard`'s writer (8 shards), and reads every
image once through a DataLoader (batches of 32) with 0, 1 and 2 workers:
- `files`: `PairsDataset` over pairs.parquet + image files;
- `shards`: `ShardPairs` over the shards, not resampled (each image once), no shuffle buffer.
Both decode and apply the same `shorter_side_crop` transform at 224 px (no augmentation),
so the ratio shards / files is the cost of the container alone. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_images import HALF, SIZE, make_photos  # noqa: E402

from vlp.data.images import ImageTransform  # noqa: E402
from vlp.data.shard_stream import ShardPairs  # noqa: E402
from vlp.data.shards import write_shards  # noqa: E402
from vlp.data.torch_data import PairsDataset, collate  # noqa: E402

BATCH = 32


def images_per_s(dataset, workers: int, n: int) -> float:
    """images/s of one full pass over `dataset` (n images) in a DataLoader with `workers`."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    seen = sum(len(batch["image_id"]) for batch in loader)
    dt = time.perf_counter() - t0
    if seen != n:
        raise RuntimeError(f"read {seen} images, expected {n}")
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    transform = ImageTransform(SIZE, "shorter_side_crop", HALF, HALF)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_photos(Path(tmp) / "photos", args.photos, 200, 1400)
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        index = write_shards(data, shards, samples_per_shard=-(-args.photos // 8))
        write_s = time.perf_counter() - t0
        # first use imports the image processor: not part of either layout's cost
        PairsDataset(data, "test", transform)[0]
        results: dict[str, object] = {
            "photos": args.photos,
            "size": SIZE,
            "shards": index["total"]["shards"],
            "shard_write_images_per_s": round(args.photos / write_s, 1),
        }
        for workers in args.workers:
            # a fresh dataset per run: PairsDataset keeps fitted images, which would favour reruns
            files = images_per_s(PairsDataset(data, "test", transform), workers, args.photos)
            streamed = ShardPairs(
                shards, ["test"], transform, seed=0, shuffle_buffer=0, resampled=False
            )
            from_shards = images_per_s(streamed, workers, args.photos)
            results[f"workers_{workers}"] = {
                "files_images_per_s": round(files, 1),
                "shards_images_per_s": round(from_shards, 1),
                "ratio_shards_over_files": round(from_shards / files, 2),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
