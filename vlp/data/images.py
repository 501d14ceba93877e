"""Images to model inputs: the evaluation transform a model keeps, and training augmentation.

A model whose image tower starts from a pretrained checkpoint with an image processor is
preprocessed by that processor (`vlp.data.processors.ProcessorTransform`). The processor is
saved in every model directory built from it, and whatever preprocesses that model reads it
from there
(`image_transforms(cfg, model_dir)`, `saved_transform`), so a model never needs its source
checkpoint again. Everything else gets the transform of the `images` params below.

`ImageTransform` is what a model sees at evaluation and serving time: the image turned
upright by its EXIF orientation, converted to RGB, resized to `size` (`squash`: bicubic to
a square, aspect ignored; `shorter_side_crop`: shorter side to `size`, then the centre
square, as the CLIP and BLIP processors do) and normalised with `mean` / `std`. A
transformers image processor (`CLIPImageProcessorPil`) does the resizing, cropping and
normalising. Every model directory records its transform (`to_dict`), so evaluation and
serving preprocess exactly as the model was trained.

`Augmentation` is what training adds on top, as BLIP does: a random resized crop (area
fraction drawn from `crop_scale`, aspect ratio from 3/4 to 4/3) and, when `hflip` is on, a
random horizontal flip that swaps the words "left" and "right" in the item's texts. Its
draws come from a generator seeded by (seed, epoch, item index), so an item's crop does
not depend on the DataLoader workers, the order items are fetched in, or a resume.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from vlp.data.decode import reduce_jpeg, upright_size
from vlp.data.processors import (
    PROCESSOR_FILE,
    ProcessorTransform,
    has_image_processor,
    native_image_size,
    pretrained_source,
)
from vlp.errors import ConfigError

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil

    from vlp.config import Config

log = logging.getLogger(__name__)

RESIZE_MODES = ("squash", "shorter_side_crop")
# what counts as an image file in a folder of images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ASPECT_RANGE = (3 / 4, 4 / 3)  # random resized crop's aspect ratios, as torchvision and BLIP
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def swap_left_right(text: str) -> str:
    """`text` with the words left and right exchanged (case kept): the text of a mirrored image."""

    def repl(m: re.Match[str]) -> str:
        word = _SWAP[m.group(0).lower()]
        if m.group(0).isupper():
            return word.upper()
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _LEFT_RIGHT.sub(repl, text)


def _triple(values: Sequence[float], key: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ConfigError(f"{key}: expected 3 values (R, G, B), got {list(values)!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class ImageTransform:
    """The evaluation transform: PIL image -> normalised float pixels [3, size, size]."""

    size: int
    resize: str  # squash | shorter_side_crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"data.image_size: must be >= 1, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"images.resize: {self.resize!r} is not one of {RESIZE_MODES}")
        object.__setattr__(self, "mean", _triple(self.mean, "images.mean"))
        object.__setattr__(self, "std", _triple(self.std, "images.std"))
        if min(self.std) <= 0:
            raise ConfigError(f"images.std: every value must be > 0, got {list(self.std)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        """The transform `to_dict` wrote (ConfigError naming a missing key)."""
        missing = [k for k in ("size", "resize", "mean", "std") if k not in d]
        if missing:
            raise ConfigError(f"image transform: missing key {missing[0]!r}")
        return cls(int(d["size"]), str(d["resize"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def resample(self) -> int:
        """The resampling filter of resizes (training crops too): bicubic."""
        return Image.Resampling.BICUBIC

    @property
    def decode_side(self) -> int:
        """The least side an input must keep for the resize (`vlp.data.decode.reduce_jpeg`)."""
        return self.size

    def model_files(self) -> dict[str, Any]:
        """JSON files a model directory holds for this transform beyond its record: none."""
        return {}

    @cached_property
    def processor(self) -> CLIPImageProcessorPil:
        """The transformers image processor that resizes, crops and normalises."""
        from transformers import CLIPImageProcessorPil

        square = {"height": self.size, "width": self.size}
        return CLIPImageProcessorPil(
            size=square if self.resize == "squash" else {"shortest_edge": self.size},
            do_center_crop=self.resize == "shorter_side_crop",
            crop_size=square,
            resample=Image.Resampling.BICUBIC,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=True,
        )

    def fit(self, img: Image.Image) -> Image.Image:
        """`img` upright, RGB, resized and cropped to size x size: the transform minus normalising.

        `pixels` of a fitted image equal `pixels` of the original, so images can be
        shrunk as soon as they are decoded. An upright RGB image already at size x size is
        returned as it is (the processor would leave it unchanged).
        """
        img = ImageOps.exif_transpose(img)
        if img.mode == "RGB" and img.size == (self.size, self.size):
            return img
        out = self.processor(img, do_rescale=False, do_normalize=False, return_tensors="np")[
            "pixel_values"
        ][0]
        return Image.fromarray(np.ascontiguousarray(out.transpose(1, 2, 0)).astype(np.uint8))

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Float pixels [N, 3, size, size] of PIL images of any size and mode."""
        # Fitting each image first keeps the float arrays at the model's size: about 4x
        # faster on photos than normalising at full resolution.
        return torch.stack([self.normalise(self.fit(img)) for img in images])

    def normalise(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        """Float pixels [3, size, size] of an RGB image (or its uint8 HWC array) at size x size.

        The processor's own rescale and normalise steps, called directly: a whole
        processor call per small image costs about 20x the arithmetic.
        """
        from transformers.image_transforms import normalize, rescale
        from transformers.image_utils import ChannelDimension

        first = ChannelDimension.FIRST
        chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        scaled = rescale(chw, self.processor.rescale_factor, first, input_data_format=first)
        return torch.from_numpy(normalize(scaled, self.mean, self.std, first, first))


@dataclass(frozen=True)
class Crop:
    """One item's augmentation draw: its crop box in the upright image of `size`, and the flip."""

    size: tuple[int, int]  # (width, height) of the upright, full-size image
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom); None: no crop
    flipped: bool

    def max_scale(self, transform: Transform) -> float:
        """How much smaller than the file the image may be decoded (`reduce_jpeg`)."""
        side = transform.decode_side
        if side is None:
            return 1.0
        if self.box is None:
            return min(self.size) / side
        left, top, right, bottom = self.box
        return min(right - left, bottom - top) / side


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation over an `ImageTransform`: random resized crop, optional flip."""

    crop_scale: tuple[float, float]  # area fraction of the crop; (1, 1): no crop
    hflip: bool
    seed: int

    def __post_init__(self) -> None:
        lo, hi = (float(x) for x in self.crop_scale) if len(self.crop_scale) == 2 else (0, -1)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"images.train_crop_scale: expected [min, max] with 0 < min <= max <= 1, "
                f"got {list(self.crop_scale)}"
            )
        object.__setattr__(self, "crop_scale", (lo, hi))

    @property
    def active(self) -> bool:
        """Whether it changes anything: off, training sees the evaluation transform's pixels."""
        return self.crop_scale != (1.0, 1.0) or self.hflip

    def draw(self, size: tuple[int, int], index: int, epoch: int) -> Crop:
        """The crop and flip of item `index` in `epoch`, for an upright image of `size` (w, h)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        box = self._crop_box(size, rng) if self.crop_scale != (1.0, 1.0) else None
        return Crop(size, box, self.hflip and bool(rng.random() < 0.5))

    def apply(
        self,
        img: Image.Image,
        transform: Transform,
        index: int,
        epoch: int,
        crop: Crop | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Pixels [3, size, size] of a random crop of `img`, and whether it was mirrored.

        `crop` is the item's `draw` when the image was decoded at reduced scale
        (`reduce_jpeg`): its box, drawn on the full-size image, is scaled to the decoded one.
        """
        img = ImageOps.exif_transpose(img).convert("RGB")
        crop = crop if crop is not None else self.draw(img.size, index, epoch)
        if crop.box is None:
            img = transform.fit(img)
        else:
            box: tuple[float, ...] = crop.box
            if img.size != crop.size:  # decoded at 1/k: libjpeg's pixel i covers [ik, (i+1)k)
                k = [round(full / got) for full, got in zip(crop.size, img.size, strict=True)]
                box = (box[0] / k[0], box[1] / k[1], box[2] / k[0], box[3] / k[1])
            img = img.resize((transform.size, transform.size), transform.resample, box=box)
        if crop.flipped:
            img = ImageOps.mirror(img)
        return transform.normalise(img), crop.flipped

    def _crop_box(self, wh: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) as torchvision's RandomResizedCrop draws it."""
        width, height = wh
        area = width * height
        log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        # fallback as torchvision: the centre crop at the nearest allowed aspect ratio
        ratio = width / height
        if ratio < ASPECT_RANGE[0]:
            w, h = width, round(width / ASPECT_RANGE[0])
        elif ratio > ASPECT_RANGE[1]:
            w, h = round(height * ASPECT_RANGE[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h


Opener = Callable[[Callable[[Image.Image], Any] | None], Image.Image]
"""Opens and decodes one image; calls its argument, when given, on the image before decoding."""


def open_fitted(opener: Opener, transform: Transform, fast: bool) -> Image.Image:
    """The image `opener` decodes, fitted by `transform`; JPEGs at reduced scale with `fast`."""
    side = transform.decode_side
    if not fast or side is None:
        return transform.fit(opener(None))
    return transform.fit(opener(lambda img: reduce_jpeg(img, min(img.size) / side)))


def open_augmented(
    opener: Opener,
    transform: Transform,
    augment: Augmentation,
    index: int,
    epoch: int,
    fast: bool,
) -> tuple[torch.Tensor, bool]:
    """`augment.apply` to the image `opener` decodes; JPEGs at reduced scale with `fast`.

    The crop is drawn on the full-size image from its header, so it is the crop of the
    exact decode; the JPEG is then decoded at the least size that crop needs.
    """
    if not fast:
        return augment.apply(opener(None), transform, index, epoch)
    crops: list[Crop] = []

    def reduce(img: Image.Image) -> None:
        if img.format == "JPEG":
            crops.append(augment.draw(upright_size(img), index, epoch))
            reduce_jpeg(img, crops[0].max_scale(transform))

    img = opener(reduce)
    return augment.apply(img, transform, index, epoch, crops[0] if crops else None)


def image_transforms(
    cfg: Config, model_dir: str | os.PathLike | None = None
) -> tuple[Transform, Augmentation | None]:
    """The evaluation transform and training augmentation (None when off) of a config.

    The transform of a saved vlp model `model_dir` (finetuning starts from one) is its
    image processor if it keeps one; without `model_dir`, that of the checkpoint the image
    tower starts from (`model.init_from`, else `model.image_pretrained`) if it has one.
    Otherwise the `images` section's transform. Its size: `images.size` if set, else the
    processor's own, else `data.image_size`. A checkpoint with a native resolution (a ViT's
    `image_size`) but no processor, run at another `data.image_size` with `images.size`
    null, is a ConfigError: which size is meant is the user's call. Augmentation draws are
    seeded by `seed`.
    """
    im = cfg.images
    if im.size is not None and (not isinstance(im.size, int) or im.size < 1):
        raise ConfigError(f"images.size: must be a positive integer or null, got {im.size!r}")
    source = (str(model_dir), model_dir) if model_dir is not None else pretrained_source(cfg.model)
    transform: Transform | None = None
    if source is not None:
        key, directory = source[0], Path(source[1]).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"{key}: {str(directory)!r} is not a local directory")
        if has_image_processor(directory):
            transform = ProcessorTransform.load(directory, key, im.size)
            _log_size(str(directory), transform.size, im.size is not None, cfg.data.image_size)
        elif model_dir is None and im.size is None:
            native = native_image_size(directory)
            if native is not None and native != cfg.data.image_size:
                raise ConfigError(
                    f"images.size: {key} ({directory}) was trained at {native} px and has no "
                    f"image processor ({PROCESSOR_FILE}), but data.image_size is "
                    f"{cfg.data.image_size}; set images.size to {native} or "
                    f"{cfg.data.image_size} to say which"
                )
    if transform is None:
        size = im.size if im.size is not None else cfg.data.image_size
        transform = ImageTransform(size, im.resize, tuple(im.mean), tuple(im.std))
    augment = Augmentation(tuple(im.train_crop_scale), im.hflip, cfg.seed)
    return transform, augment if augment.active else None


@cache  # once per process and setting: every stage resolves its transform several times
def _log_size(directory: str, size: int, explicit: bool, data_size: int) -> None:
    log.log(
        logging.WARNING if size != data_size else logging.INFO,
        "images: %d px (%s; data.image_size is %d), preprocessed by the image processor of %s "
        "(images.resize, mean and std are not used)",
        size,
        "images.size" if explicit else "the processor's own size",
        data_size,
        directory,
    )


def image_params(transform: Transform) -> dict[str, Any]:
    """What a stage's MLflow params record of its transform: the size used and its processor."""
    processor = None
    if isinstance(transform, ProcessorTransform):
        processor = type(transform.processor).__name__.removesuffix("Pil")
    return {"image_size": transform.size, "image_processor": processor}


Transform = ImageTransform | ProcessorTransform


def saved_transform(model_dir: str | os.PathLike, recorded: dict[str, Any]) -> Transform:
    """The evaluation transform a model directory keeps.

    `recorded` is its record (`to_dict`: image_transform.json, or task.json's with its size).
    A directory with an image processor (`preprocessor_config.json`) is preprocessed by it;
    ConfigError if the record names a processor the directory lacks, or another size.
    """
    directory = Path(model_dir)
    if (directory / PROCESSOR_FILE).is_file():
        transform = ProcessorTransform.load(directory, str(directory))
        if "size" in recorded and int(recorded["size"]) != transform.size:
            raise ConfigError(
                f"{directory / PROCESSOR_FILE}: makes {transform.size} px images, but the model "
                f"records an image size of {recorded['size']}"
            )
        return transform
    if "processor" in recorded:
        raise ConfigError(
            f"{directory}: the model is preprocessed by an image processor, but "
            f"{recorded['processor']} is missing"
        )
    return ImageTransform.from_dict(recorded)
