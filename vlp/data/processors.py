"""transformers' image processors as vlp transforms: loading, saving and resizing them.

A model whose image tower starts from a pretrained checkpoint (`model.init_from`,
`model.image_pretrained`) with an image processor (`preprocessor_config.json`) is preprocessed
by that processor (`ProcessorTransform`): its resize and crop, resampling, rescaling, mean/std
and RGB conversion, at its own size unless `images.size` asks for another (the processor's
resize and crop sizes are then scaled to it). The processor is saved in every model directory
built from it (`save_processor`), so a model never needs its source checkpoint again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

    from vlp.config import ModelConfig

PROCESSOR_FILE = "preprocessor_config.json"  # transformers' image processor file (save_pretrained)


def pretrained_source(model: ModelConfig) -> tuple[str, str] | None:
    """(params key, directory) of the checkpoint the image tower starts from, or None.

    `model.init_from` (a whole CLIP / BLIP model) before `model.image_pretrained`.
    """
    for key in ("init_from", "image_pretrained"):
        value = getattr(model, key, None)
        if value:
            return f"model.{key}", str(value)
    return None


def native_image_size(directory: str | os.PathLike) -> int | None:
    """The resolution a checkpoint's vision transformer was trained at, or None if it has none.

    A ViT's (or ViTMAE's) `image_size`, or the `vision_config.image_size` of a CLIP / BLIP model: their
    position embeddings are learned at that size. CNNs have none.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError):
        return None  # no transformers config: the model loader names the problem
    vision = getattr(config, "vision_config", None)
    if vision is None and config.model_type not in ("vit", "vit_mae"):
        return None
    size = getattr(vision if vision is not None else config, "image_size", None)
    if isinstance(size, list | tuple):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if isinstance(size, int) else None


def save_processor(
    source: str | os.PathLike | ModelConfig, out_dir: str | os.PathLike, size: int | None = None
) -> bool:
    """Save a checkpoint's image processor into a model directory; whether it has one.

    `source` is the checkpoint directory, or a ModelConfig whose `init_from` (else
    `image_pretrained`) names it; `size` is `images.size` (None: the processor's own size,
    otherwise its resize and crop sizes are scaled to it). Written with `save_pretrained`
    (`preprocessor_config.json`), so loading the model directory preprocesses as the
    checkpoint does. `out_dir` is created if needed.
    """
    key = str(source)
    if not isinstance(source, str | os.PathLike):
        found = pretrained_source(source)
        if found is None:
            return False
        key, source = found
    directory = Path(source).expanduser()
    if not has_image_processor(directory):
        return False
    ProcessorTransform.load(directory, key, size).save(out_dir)
    return True


def has_image_processor(directory: Path) -> bool:
    """Whether a checkpoint directory keeps an image processor.

    `preprocessor_config.json` (an image processor's `save_pretrained`), or the
    `image_processor` entry of `processor_config.json` (a multimodal processor's, e.g.
    `BlipProcessor`).
    """
    if (directory / PROCESSOR_FILE).is_file():
        return True
    combined = directory / "processor_config.json"
    if not combined.is_file():
        return False
    try:
        return "image_processor" in json.loads(combined.read_text())
    except (OSError, ValueError):
        return False


def load_processor(directory: str | os.PathLike, key: str) -> BaseImageProcessor:
    """The image processor saved in a local directory (PIL backend); ConfigError naming `key`.

    The PIL backend keeps the resized image in uint8, so `ProcessorTransform.fit` can hand
    it on as an image and normalising it later gives the processor's own pixels.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(
            str(directory), local_files_only=True, backend="pil"
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{key}: cannot load the image processor {Path(directory) / PROCESSOR_FILE}: {e}"
        ) from e


_PROBES = ((97, 61), (61, 97))  # a wide and a tall image: the output size may not depend on them


def _output_side(processor: BaseImageProcessor, key: str) -> int:
    """The side of the square images `processor` makes of any input; ConfigError otherwise."""
    shapes = set()
    for wh in _PROBES:
        out = processor(
            Image.new("RGB", wh),
            do_convert_rgb=True,
            do_rescale=False,
            do_normalize=False,
            return_tensors="np",
        )["pixel_values"]
        shapes.add(tuple(int(x) for x in out.shape[1:]))
    shape = shapes.pop()
    if shapes or shape[0] != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"{key}: its image processor makes images of shape {[shape, *shapes]} from a wide "
            "and a tall image; vlp needs one square size for every image (resize to a "
            "height and width, or a shortest edge and a centre crop)"
        )
    return shape[1]


def _resized(processor: BaseImageProcessor, side: int, native: int, key: str) -> Any:
    """`processor` with its resize and crop sizes scaled from `native` to `side` px."""
    ratio = side / native
    settings = processor.to_dict()
    for name in ("size", "crop_size"):
        if isinstance(settings.get(name), dict):
            settings[name] = {
                k: round(v * ratio) if isinstance(v, int) else v for k, v in settings[name].items()
            }
    scaled = type(processor).from_dict(settings)
    got = _output_side(scaled, key)
    if got != side:
        raise ConfigError(
            f"images.size: {side} px: the image processor of {key} scaled from {native} px "
            f"makes {got} px images"
        )
    return scaled


_FITTED = "vlp.fitted"  # PIL info key marking an image `ProcessorTransform.fit` made


class ProcessorTransform:
    """The evaluation transform of a transformers image processor: PIL image -> [3, size, size].

    Pixels equal `processor(images=..., return_tensors="pt")["pixel_values"]` for every image
    the processor accepts, after turning the image upright by its EXIF orientation; images
    are always converted to RGB (as the processor does with `do_convert_rgb`).
    """

    def __init__(self, processor: BaseImageProcessor, key: str) -> None:
        self.processor = processor
        self.size = _output_side(processor, key)
        self._mark = hashlib.sha256(processor.to_json_string().encode()).hexdigest()[:16]

    @classmethod
    def load(
        cls, directory: str | os.PathLike, key: str, size: int | None = None
    ) -> ProcessorTransform:
        """The processor saved in `directory`, at `size` px (None: its own size)."""
        transform = cls(load_processor(directory, key), key)
        if size is None or size == transform.size:
            return transform
        return cls(_resized(transform.processor, size, transform.size, key), key)

    @property
    def resample(self) -> int:
        """The processor's resampling filter (training crops resize with it too)."""
        resample = self.processor.resample
        return Image.Resampling.BILINEAR if resample is None else int(resample)  # as PIL backend

    @cached_property
    def decode_side(self) -> int | None:
        """The least side an input must keep for the processor's resize and crop, or None.

        The largest side its `size` and `crop_size` name (`vlp.data.decode.reduce_jpeg`
        decodes no smaller); None when the processor does not resize: any smaller input
        would change its output.
        """
        settings = self.processor.to_dict()
        if not settings.get("do_resize", False):
            return None
        sides = [
            v
            for name in ("size", "crop_size")
            if isinstance(settings.get(name), dict)
            for k, v in settings[name].items()
            if k in ("height", "width", "shortest_edge", "longest_edge") and isinstance(v, int)
        ]
        return max(sides) if sides else None

    def to_dict(self) -> dict[str, Any]:
        """The record of the transform beside a model: its size and the processor's file."""
        return {"size": self.size, "processor": PROCESSOR_FILE}

    def model_files(self) -> dict[str, Any]:
        """`{preprocessor_config.json: content}`: what `save_pretrained` writes, as JSON."""
        return {PROCESSOR_FILE: json.loads(self.processor.to_json_string())}

    def save(self, directory: str | os.PathLike) -> None:
        """Save the processor (`save_pretrained`) into a model directory being assembled."""
        self.processor.save_pretrained(str(directory))

    def fit(self, img: Image.Image) -> Image.Image:
        """`img` upright, RGB, resized and cropped by the processor: the transform minus rescaling.

        `pixels` of a fitted image equal `pixels` of the original (the fitted image is
        marked, and not resized again), so images can be shrunk as soon as they are decoded.
        """
        if (
            img.info.get(_FITTED) == self._mark
            and img.mode == "RGB"
            and img.size == (self.size, self.size)
        ):
            return img
        img = ImageOps.exif_transpose(img)
        out = self.processor(
            img, do_convert_rgb=True, do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        fitted = Image.fromarray(np.ascontiguousarray(out.transpose(1, 2, 0)).astype(np.uint8))
        fitted.info[_FITTED] = self._mark
        return fitted

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Float pixels [N, 3, size, size] of PIL images of any size and mode."""
        return torch.stack([self.normalise(self.fit(img)) for img in images])

    def normalise(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        """Float pixels [3, size, size] of a fitted RGB image (or its uint8 HWC array).

        The processor's own rescale and normalise steps, as its `do_rescale` and
        `do_normalize` say.
        """
        p = self.processor
        x: np.ndarray = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        if p.do_rescale:
            x = p.rescale(x, p.rescale_factor)
        if p.do_normalize:
            x = p.normalize(x, p.image_mean, p.image_std)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
