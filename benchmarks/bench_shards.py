"""Shard reading benchmark: samples/s read and decoded from webdataset shards vs Parquet + files.

Run: .venv/bin/python benchmarks/bench_shards.py [--photos 300] [--captions 5] [--workers 0 1 2]
     [--data photos|shapes]

Writes a temp dataset directory (`photos`: synthetic JPEG photos of mixed sizes, 200-1400 px a
side, as bench_images.py, with `--captions` captions each; `shapes`: the shapes world's
pretraining split at params.yaml's image size, PNG), shards it with `vlp shard`'s writer (8
shards), and reads it through a DataLoader (batches of 32) with 0, 1 and 2 workers:
- `one_pass`: every image once: `PairsDataset` over one caption per image vs `ShardPairs`
  not resampled, no shuffle buffer;
- `training`: two epochs as the training loop reads them (one item per caption, persistent
  workers): `PairsDataset` in a shuffled order vs `ShardPairs` resampled with a shuffle
  buffer of 1000 (`data.shuffle_buffer`).
Both decode and apply the same transform (`shorter_side_crop` at 224 px for photos, the
shapes world's `squash`), no augmentation. Ratios are shards / files within one run.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_images import HALF, SIZE, make_photos  # noqa: E402

from vlp.data.images import ImageTransform  # noqa: E402
from vlp.data.manifest import PAIRS_FILE, read_pairs, write_manifest  # noqa: E402
from vlp.data.shard_stream import ShardPairs  # noqa: E402
from vlp.data.shards import write_shards  # noqa: E402
from vlp.data.torch_data import PairsDataset, collate  # noqa: E402

BATCH = 32
REPO = Path(__file__).resolve().parents[1]


def with_captions(data: Path, k: int) -> Path:
    """Give every image of a dataset directory `k` captions (ids image_id * k + j)."""
    pairs = read_pairs(data, None).drop_duplicates("image_id")
    rows = [
        {**row, "caption_id": int(row["image_id"]) * k + j, "caption": f"{row['caption']} {j}"}
        for row in pairs.to_dict("records")
        for j in range(k)
    ]
    write_manifest(pd.DataFrame(rows), data / PAIRS_FILE)
    return data


def shapes(root: Path, n: int) -> tuple[Path, str, ImageTransform]:
    """The shapes world's pretraining split of `n` images, its split name and transform."""
    import dataclasses

    from vlp.config import load_config
    from vlp.data.shapes import generate_dataset

    cfg = load_config(REPO / "params.yaml")
    d = dataclasses.replace(cfg.data, n_pretrain=n, n_train=8, n_val=8, n_test=8)
    size = d.image_size
    return generate_dataset(d, root), "pretrain", ImageTransform(size, "squash", HALF, HALF)


def training_samples_per_s(dataset, workers: int, epochs: int = 2) -> float:
    """samples/s of `epochs` epochs read as the training loop reads them (persistent workers)."""
    streamed = isinstance(dataset, ShardPairs)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=not streamed,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        if streamed:
            dataset.set_epoch(epoch, BATCH)
        seen += sum(len(batch["image_id"]) for batch in loader)
    return seen / (time.perf_counter() - t0)


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
    ap.add_argument("--photos", type=int, default=300, help="images")
    ap.add_argument("--captions", type=int, default=5, help="captions per photo")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", choices=["photos", "shapes"], default="photos")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "photos":
            data = with_captions(
                make_photos(Path(tmp) / "photos", args.photos, 200, 1400), args.captions
            )
            split, transform = "test", ImageTransform(SIZE, "shorter_side_crop", HALF, HALF)
        else:
            data, split, transform = shapes(Path(tmp) / "shapes", args.photos)
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        index = write_shards(data, shards, samples_per_shard=-(-args.photos // 8), splits=[split])
        write_s = time.perf_counter() - t0
        # first use imports the image processor: not part of either layout's cost
        PairsDataset(data, split, transform)[0]
        results: dict[str, object] = {
            "data": args.data,
            "images": args.photos,
            "captions": len(read_pairs(data, split)),
            "size": transform.size,
            "shards": index["total"]["shards"],
            "shard_write_images_per_s": round(args.photos / write_s, 1),
        }
        for workers in args.workers:
            # a fresh dataset per run: both keep fitted images, which would favour reruns
            files = images_per_s(
                PairsDataset(data, split, transform, first_caption_only=True), workers, args.photos
            )
            streamed = ShardPairs(
                shards, [split], transform, seed=0, shuffle_buffer=0, resampled=False
            )
            from_shards = images_per_s(streamed, workers, args.photos)
            files_t = training_samples_per_s(PairsDataset(data, split, transform), workers)
            streamed = ShardPairs(shards, [split], transform, seed=0, shuffle_buffer=1000)
            shards_t = training_samples_per_s(streamed, workers)
            results[f"workers_{workers}"] = {
                "one_pass_files_images_per_s": round(files, 1),
                "one_pass_shards_images_per_s": round(from_shards, 1),
                "one_pass_shards_over_files": round(from_shards / files, 2),
                "training_files_samples_per_s": round(files_t, 1),
                "training_shards_samples_per_s": round(shards_t, 1),
                "training_shards_over_files": round(shards_t / files_t, 2),
            }
            print(
                json.dumps({f"workers_{workers}": results[f"workers_{workers}"]}), file=sys.stderr
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
