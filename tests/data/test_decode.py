"""Reduced-scale JPEG decoding (`images.fast_decode`): sizes kept, pixels close, PNG untouched."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from vlp.data.decode import fast_decode, reduce_jpeg, upright_size
from vlp.data.images import Augmentation, ImageTransform, open_augmented, open_fitted
from vlp.data.manifest import IMAGES_DIR, PAIRS_FILE, write_manifest
from vlp.data.processors import ProcessorTransform
from vlp.data.shards import open_image
from vlp.data.torch_data import ImagesDataset
from vlp.errors import ConfigError

HALF = (0.5, 0.5, 0.5)
# Tolerance of a reduced decode against the exact one, in 8-bit steps of the fitted image:
# measured 0.45-0.7 mean and 4-7 max on smooth photos (benchmarks/bench_images.py).
MEAN_STEPS, MAX_STEPS = 1.5, 12


def _photo(w: int, h: int, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """Smooth noise at w x h, encoded as `fmt` (with an EXIF orientation if given)."""
    rng = np.random.default_rng(w * h)
    coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(out, fmt, quality=90, exif=exif.tobytes()) if fmt == "JPEG" else img.save(out, fmt)
    return out.getvalue()


def _opener(data: bytes):
    return partial(open_image, data, "shard", "key")


def _steps(a: Image.Image | torch.Tensor, b: Image.Image | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):  # normalised with mean = std = 0.5: 2 / 255 per step
        return (a - b).abs().numpy() * 127.5
    return np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


@pytest.mark.parametrize(
    ("wh", "max_scale", "k", "decoded"),
    [
        ((640, 480), 480 / 224, 2, (320, 240)),
        ((4000, 3000), 3000 / 224, 8, (500, 375)),
        ((1000, 900), 900 / 224, 4, (250, 225)),
        ((400, 300), 300 / 224, 1, (400, 300)),  # less than 2x: decoded whole
    ],
)
def test_reduce_jpeg_takes_the_largest_scale_the_side_allows(wh, max_scale, k, decoded):
    img = Image.open(io.BytesIO(_photo(*wh)))
    assert reduce_jpeg(img, max_scale) == k
    img.load()
    assert img.size == decoded
    assert min(img.size) >= 224 or k == 1


def test_other_formats_and_loaded_images_decode_whole():
    png = Image.open(io.BytesIO(_photo(640, 480, "PNG")))
    assert reduce_jpeg(png, 8) == 1
    png.load()
    assert png.size == (640, 480)
    loaded = Image.open(io.BytesIO(_photo(640, 480)))
    loaded.load()
    assert reduce_jpeg(loaded, 8) == 1
    assert loaded.size == (640, 480)


def test_upright_size_reads_the_exif_orientation():
    assert upright_size(Image.open(io.BytesIO(_photo(640, 480, orientation=6)))) == (480, 640)
    assert upright_size(Image.open(io.BytesIO(_photo(640, 480, orientation=3)))) == (640, 480)


def test_fast_decode_modes():
    assert [fast_decode(m, True) for m in ("train", "always", "never")] == [True, True, False]
    assert [fast_decode(m, False) for m in ("train", "always", "never")] == [False, True, False]
    with pytest.raises(ConfigError, match="images.fast_decode: 'fast'"):
        fast_decode("fast", True)


TRANSFORMS = {
    "squash": ImageTransform(224, "squash", HALF, HALF),
    "shorter_side_crop": ImageTransform(224, "shorter_side_crop", HALF, HALF),
    # a processor-exact model path: CLIP's shortest edge 224 and centre crop
    "clip_processor": ProcessorTransform(CLIPImageProcessorPil(), "CLIP"),
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("wh", [(640, 480), (2400, 1800), (480, 900)])
def test_reduced_decode_keeps_the_size_and_nearly_the_pixels(name, wh):
    transform = TRANSFORMS[name]
    data = _photo(*wh, orientation=6 if wh[0] > 2000 else None)
    exact = open_fitted(_opener(data), transform, fast=False)
    fast = open_fitted(_opener(data), transform, fast=True)
    assert fast.size == exact.size == (224, 224)
    d = _steps(exact, fast)
    assert d.mean() < MEAN_STEPS and d.max() <= MAX_STEPS, (d.mean(), d.max())
    assert d.max() > 0  # it did decode at reduced scale


def test_png_is_decoded_exactly():
    transform = TRANSFORMS["shorter_side_crop"]
    data = _photo(900, 700, "PNG")
    exact = open_fitted(_opener(data), transform, fast=False)
    assert np.array_equal(
        np.asarray(exact), np.asarray(open_fitted(_opener(data), transform, True))
    )
    aug = Augmentation((0.3, 1.0), True, seed=0)
    for index in range(4):
        a = open_augmented(_opener(data), transform, aug, index, 1, fast=False)
        b = open_augmented(_opener(data), transform, aug, index, 1, fast=True)
        assert a[1] == b[1] and torch.equal(a[0], b[0])


@pytest.mark.parametrize("orientation", [None, 6])
def test_reduced_decode_crops_where_the_exact_decode_does(orientation):
    """The crop is drawn on the full-size image: same box, same flip, pixels close."""
    transform = TRANSFORMS["shorter_side_crop"]
    data = _photo(3000, 2000, orientation=orientation)
    aug = Augmentation((0.2, 1.0), True, seed=3)
    flips = []
    for index in range(6):
        exact, flipped = open_augmented(_opener(data), transform, aug, index, 0, fast=False)
        fast, fast_flipped = open_augmented(_opener(data), transform, aug, index, 0, fast=True)
        assert fast_flipped == flipped and fast.shape == exact.shape == (3, 224, 224)
        d = _steps(exact, fast)
        assert d.mean() < MEAN_STEPS and d.max() <= MAX_STEPS, (index, d.mean(), d.max())
        flips.append(flipped)
    assert len(set(flips)) == 2  # both branches seen


def test_datasets_decode_reduced_only_when_asked(tmp_path: Path):
    (tmp_path / IMAGES_DIR).mkdir()
    rows = []
    for i, fmt in enumerate(["JPEG", "PNG"]):
        rel = f"{IMAGES_DIR}/{i}.{fmt.lower()}"
        (tmp_path / rel).write_bytes(_photo(1200, 800, fmt))
        rows.append({"caption_id": i, "image_id": i, "image_path": rel, "caption": "a photo"})
    write_manifest(pd.DataFrame(rows).assign(split="test"), tmp_path / PAIRS_FILE)
    transform = TRANSFORMS["squash"]
    exact = ImagesDataset(tmp_path, "test", transform)
    fast = ImagesDataset(tmp_path, "test", transform, fast_jpeg=True)
    jpeg_exact, jpeg_fast = exact[0]["pixel_values"], fast[0]["pixel_values"]
    assert not torch.equal(jpeg_exact, jpeg_fast)
    assert _steps(jpeg_exact, jpeg_fast).mean() < MEAN_STEPS
    assert torch.equal(exact[1]["pixel_values"], fast[1]["pixel_values"])  # the PNG
