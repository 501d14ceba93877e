"""Image transforms: the evaluation transform, EXIF, normalisation, training augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vlp.config import Config
from vlp.data.images import Augmentation, ImageTransform, image_transforms, swap_left_right
from vlp.data.torch_data import ImagesDataset, PairsDataset, open_image
from vlp.errors import ConfigError

HALF = (0.5, 0.5, 0.5)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _squashed_before(path: Path, size: int) -> torch.Tensor:
    """The preprocessing the shapes pipeline's scores were measured with, written out."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float() / 255.0 - 0.5) / 0.5


@pytest.mark.parametrize("size", [32, 24])  # the shapes' own size, and a bicubic resize
def test_default_transform_gives_the_shapes_pipeline_its_pixels_bit_for_bit(
    smoke_cfg: Config, smoke_data: Path, size: int
) -> None:
    transform = image_transforms(smoke_cfg)[0]
    assert (transform.resize, transform.mean, transform.std) == ("squash", HALF, HALF)
    transform = ImageTransform(size, "squash", HALF, HALF)
    ds = ImagesDataset(smoke_data, "test", transform)
    for i, rel in enumerate(ds.frame["image_path"]):
        assert torch.equal(ds[i]["pixel_values"], _squashed_before(smoke_data / rel, size))


def _wide_photo() -> Image.Image:
    """448x172: a green square in the middle, red on its left, blue on its right."""
    img = Image.new("RGB", (448, 172), GREEN)
    img.paste(RED, (0, 0, 138, 172))
    img.paste(BLUE, (310, 0, 448, 172))
    return img


def test_shorter_side_crop_keeps_the_aspect_and_takes_the_centre() -> None:
    crop = ImageTransform(64, "shorter_side_crop", HALF, HALF).fit(_wide_photo())
    assert crop.size == (64, 64)
    arr = np.asarray(crop).astype(int)
    # the centre square fills the crop: green everywhere but a resampling seam at the edges
    assert (np.abs(arr[:, 2:-2] - GREEN).max(axis=-1) <= 8).all()
    squashed = np.asarray(ImageTransform(64, "squash", HALF, HALF).fit(_wide_photo()))
    assert tuple(squashed[32, 0]) == RED and tuple(squashed[32, -1]) == BLUE


def test_fitting_first_changes_no_pixel() -> None:
    for mode in ("squash", "shorter_side_crop"):
        t = ImageTransform(48, mode, HALF, HALF)
        photo = _wide_photo()
        assert torch.equal(t.pixels([t.fit(photo)]), t.pixels([photo]))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.new("RGB", (30, 20), RED)
    upright.paste(BLUE, (0, 0, 10, 20))  # blue band on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "photo.png", exif=exif)
    opened = open_image(tmp_path / "photo.png")
    assert opened.size == (20, 30)
    t = ImageTransform(16, "squash", HALF, HALF)
    assert torch.equal(t.pixels([opened]), t.pixels([upright]))
    assert not torch.equal(t.pixels([opened]), t.pixels([stored]))


def test_mean_and_std_are_applied() -> None:
    t = ImageTransform(8, "squash", (0.1, 0.2, 0.3), (0.5, 0.25, 0.1))
    x = t.pixels([Image.new("RGB", (8, 8), (255, 0, 51))])[0]
    expected = torch.tensor([(1 - 0.1) / 0.5, (0 - 0.2) / 0.25, (0.2 - 0.3) / 0.1])
    assert torch.allclose(x[:, 3, 3], expected, atol=1e-6)


def test_bad_transform_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="images.resize"):
        ImageTransform(8, "stretch", HALF, HALF)
    with pytest.raises(ConfigError, match="images.std"):
        ImageTransform(8, "squash", HALF, (0.5, 0.0, 0.5))
    with pytest.raises(ConfigError, match="images.mean"):
        ImageTransform(8, "squash", (0.5,), HALF)
    with pytest.raises(ConfigError, match="images.train_crop_scale"):
        Augmentation((0.8, 0.5), False, 0)


def test_swap_left_right() -> None:
    assert swap_left_right("a circle left of a square, Right of a star") == (
        "a circle right of a square, Left of a star"
    )
    assert swap_left_right("bright leftover") == "bright leftover"


def test_hflip_mirrors_the_image_and_swaps_left_and_right_in_the_caption(
    smoke_data: Path,
) -> None:
    t = ImageTransform(32, "squash", HALF, HALF)
    plain = PairsDataset(smoke_data, "val", t)
    flips = PairsDataset(smoke_data, "val", t, Augmentation((1.0, 1.0), True, seed=0))
    assert flips.takes_epoch and not plain.takes_epoch
    mirrored = 0
    for i in range(len(plain)):
        a, b = plain[i], flips[(i, 0)]
        if torch.equal(b["pixel_values"], a["pixel_values"].flip(-1)):
            mirrored += 1
            assert b["caption"] == swap_left_right(a["caption"])
        else:
            assert torch.equal(b["pixel_values"], a["pixel_values"])
            assert b["caption"] == a["caption"]
    assert 0 < mirrored < len(plain)
    assert any(" left " in plain[i]["caption"] for i in range(len(plain)))


def test_an_images_dataset_draws_the_crops_of_a_pairs_dataset(smoke_data: Path) -> None:
    """Visual pretraining's images: one item per image, cropped as the pairs are."""
    t = ImageTransform(32, "squash", HALF, HALF)
    augment = Augmentation((0.3, 0.5), True, seed=0)
    images = ImagesDataset(smoke_data, "val", t, augment)
    pairs = PairsDataset(smoke_data, "val", t, augment, first_caption_only=True)
    assert images.takes_epoch and len(images) == len(pairs)
    for key in [(i, epoch) for i in range(len(images)) for epoch in (0, 1)]:
        assert torch.equal(images[key]["pixel_values"], pairs[key]["pixel_values"])
    assert not torch.equal(images[(0, 0)]["pixel_values"], images[(0, 1)]["pixel_values"])


def test_train_crop_scale_draws_crops_per_item_and_epoch(smoke_data: Path) -> None:
    t = ImageTransform(32, "squash", HALF, HALF)
    augment = Augmentation((0.3, 0.5), False, seed=0)
    plain = ImagesDataset(smoke_data, "val", t)
    crops = PairsDataset(smoke_data, "val", t, augment, first_caption_only=True)
    pixels = [crops[(i, 0)]["pixel_values"] for i in range(len(crops))]
    assert all(p.shape == (3, 32, 32) for p in pixels)
    assert not any(torch.equal(p, plain[i]["pixel_values"]) for i, p in enumerate(pixels))
    assert all(torch.equal(crops[(i, 0)]["pixel_values"], p) for i, p in enumerate(pixels))
    assert not torch.equal(crops[(0, 1)]["pixel_values"], pixels[0])  # a new epoch, a new crop
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = augment._crop_box((448, 172), rng)
        area = (right - left) * (bottom - top) / (448 * 172)
        assert 0 <= left < right <= 448 and 0 <= top < bottom <= 172
        aspect = (right - left) / (bottom - top)
        assert 0.28 <= area <= 0.52 and 0.73 <= aspect <= 1.36  # rounding to whole pixels


def test_augmentation_is_off_at_the_defaults(smoke_cfg: Config) -> None:
    assert image_transforms(smoke_cfg)[1] is None


def test_mirror_of_a_fitted_image_is_the_flip_of_its_pixels() -> None:
    t = ImageTransform(16, "squash", HALF, HALF)
    img = t.fit(_wide_photo())
    assert torch.equal(t.pixels([ImageOps.mirror(img)]), t.pixels([img]).flip(-1))


class _PixelProbe(torch.nn.Module):
    """A model whose trained weight depends on every pixel it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, 32, 32))

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((pixel_values - self.w) ** 2).mean()}


@pytest.mark.slow  # starts DataLoader worker processes
def test_augmented_training_is_the_same_with_persistent_workers(
    smoke_data: Path, tmp_path: Path
) -> None:
    from tests.train.settings import train_settings
    from vlp.train.loop import train

    t = ImageTransform(32, "squash", HALF, HALF)
    augment = Augmentation((0.3, 1.0), True, seed=0)
    weights = []
    for workers in (0, 2):
        ds = PairsDataset(smoke_data, "val", t, augment)
        model = _PixelProbe()
        settings = train_settings(
            epochs=3, batch_size=8, lr=0.1, device="cpu", precision="fp32", num_workers=workers
        )
        collate = lambda items: {"pixel_values": torch.stack([i["pixel_values"] for i in items])}  # noqa: E731
        train(model, ds, collate, settings, tmp_path / f"w{workers}")
        weights.append(model.w.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert weights[0].abs().sum() > 0


@pytest.mark.parametrize("resize", ["squash", "shorter_side_crop"])
def test_pixels_equal_the_image_processor_bit_for_bit(resize: str) -> None:
    """The fitted-then-normalised path is the transformers processor's own result."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))]
    images += [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((15, 40), (50, 20))
    ]
    images += [
        Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8), "L"),
    ]
    transform = ImageTransform(24, resize, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))
    expected = transform.processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(transform.pixels(images), expected)
