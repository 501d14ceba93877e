"""A checkpoint directory as an encoder: whatever wrote it, one encoding interface.

`load_encoder(path)` inspects a local directory and loads it:

- `vlp_config.json`: a vlp model directory (the pretrained model, or a finetuned task model
  with its `task.json`); the fusion family loads as a `VLPModel`, the clip family as a
  `CLIPDualEncoder`. Its image transform is the one it records (`task.json`, else
  `image_transform.json` beside the pretrained weights);
- `config.json` with `model_type` "clip": a transformers `CLIPModel` directory;
- `config.json` with `model_type` "blip": a transformers BLIP retrieval directory
  (`BlipForImageTextRetrieval`), loaded as a `VLPModel` with its ITM head.

A raw transformers directory is preprocessed by its own image processor
(`preprocessor_config.json`, through `AutoImageProcessor`) and tokenised by its own
tokenizer. The returned `Encoder` holds the model, whose `encode_image(pixels)` and
`encode_text(input_ids, attention_mask)` return `(states, L2-normalised features)` and
whose `tokenize(texts)` gives their inputs, and the image transform to apply first
(`pixels(images) -> [N, 3, H, W]`). Models with an ITM head (`itm_logits`) also re-rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.tokenizer import local_dir

if TYPE_CHECKING:
    from vlp.config import ModelConfig

CHECKPOINT_KINDS = ("vlp", "clip", "blip")
# The pretrained model's evaluation transform (`ImageTransform.to_dict`), beside its weights.
IMAGE_TRANSFORM_FILE = "image_transform.json"
_VLP_CONFIG = "vlp_config.json"  # vlp.models.vlp_model.CONFIG_NAME (not imported: keeps this light)
_HF_CONFIG = "config.json"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """ "vlp", "clip" or "blip": what wrote the directory at `path`; ConfigError otherwise."""
    p = local_dir(path, "--model")
    if (p / _VLP_CONFIG).is_file():
        return "vlp"
    if (p / _HF_CONFIG).is_file():
        try:
            model_type = json.loads((p / _HF_CONFIG).read_text()).get("model_type")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{p / _HF_CONFIG}: not a readable transformers config ({e})") from e
        if model_type in ("clip", "blip"):
            return model_type
        raise ConfigError(
            f"{p / _HF_CONFIG}: model_type {model_type!r} is not a checkpoint vlp can encode "
            "with (clip or blip)"
        )
    raise ConfigError(
        f"{p}: not a model directory (no {_VLP_CONFIG} of a vlp model, no {_HF_CONFIG} of a "
        "transformers CLIP or BLIP checkpoint)"
    )


class ProcessorTransform:
    """A transformers image processor as an image transform: PIL images -> pixel batch."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def fit(self, img: Any) -> Any:
        """`img` upright and RGB; the processor does the resizing in `pixels`."""
        from PIL import ImageOps

        return ImageOps.exif_transpose(img).convert("RGB")

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Float pixels [N, 3, H, W] as the processor makes them."""
        return self.processor(images=[self.fit(img) for img in images], return_tensors="pt")[
            "pixel_values"
        ]


def processor_transform(path: Path) -> ProcessorTransform:
    """The image processor saved in a transformers checkpoint directory, as a transform."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: cannot load its image processor (preprocessor_config.json): {e}"
        ) from e
    return ProcessorTransform(processor)


@dataclass
class Encoder:
    """A loaded checkpoint: its model, the image transform it expects, and what it is."""

    kind: str  # vlp | clip | blip
    path: Path
    model: Any  # encode_image, encode_text, tokenize; itm_logits and temp when it re-ranks
    transform: Any  # pixels(images) -> [N, 3, H, W]
    task_info: dict[str, Any] | None  # the task.json of a finetuned vlp task model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_itm(self) -> bool:
        """Whether the model scores (image, text) pairs with an ITM head (re-ranking)."""
        return hasattr(self.model, "itm_logits")

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image states [B, N, H], L2-normalised features [B, E]) of a pixel batch."""
        return self.model.encode_image(pixels.to(self.device))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features [M, E] of one batch of texts."""
        enc = self.model.tokenize(list(texts))
        return self.model.encode_text(
            enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        )[1]


def _vlp_transform(p: Path, task_info: dict[str, Any] | None) -> Any:
    from vlp.data.images import ImageTransform

    if task_info is not None:
        from vlp.tasks import image_transform

        return image_transform(task_info)
    path = p / IMAGE_TRANSFORM_FILE
    if not path.is_file():
        raise ConfigError(
            f"{p}: a vlp model without task.json or {IMAGE_TRANSFORM_FILE}: its image "
            "transform is unknown"
        )
    from vlp.io import load_json

    return ImageTransform.from_dict(load_json(path, ConfigError))


def _load_vlp(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.models.family import load_model
    from vlp.tasks import TASK_FILE, read_task_info

    task_info = read_task_info(p) if (p / TASK_FILE).is_file() else None
    transform = _vlp_transform(p, task_info)
    return Encoder("vlp", p, load_model(p, device).eval(), transform, task_info)


def _load_clip(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.models.clip import CLIPDualEncoder

    model = CLIPDualEncoder.from_checkpoint(p, base=None, device=device, key="--model")
    return Encoder("clip", p, model.eval(), processor_transform(p), None)


def _load_blip(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.models.blip import blip_architecture, load_blip

    arch = blip_architecture(p, "--model")
    if arch != "BlipForImageTextRetrieval":
        raise ConfigError(
            f"--model: {p} holds a {arch}; only BlipForImageTextRetrieval has the trained ITC "
            "and ITM heads that encode and re-rank"
        )
    if base is None:
        raise ConfigError(f"{p}: a BLIP checkpoint loads over a model config (params' model)")
    # texts as long as the checkpoint's positions allow, as a CLIP checkpoint's
    unbounded = dataclasses.replace(base, max_text_length=sys.maxsize)
    model = load_blip(p, unbounded, temperature, key="--model").to(device)
    return Encoder("blip", p, model.eval(), processor_transform(p), None)


def load_encoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    base: ModelConfig | None = None,
    temperature: float = 0.07,
) -> Encoder:
    """Load the checkpoint at `path` (vlp, CLIP or BLIP directory) as an `Encoder` on `device`.

    A BLIP checkpoint needs `base` (params' model section) for what it does not decide, and
    takes `temperature` as its ITC temperature unless its weights store one (BLIP's `temp`).
    Raw checkpoints read texts up to their own text positions.
    """
    p = local_dir(path, "--model")
    kind = checkpoint_kind(p)
    loader = {"vlp": _load_vlp, "clip": _load_clip, "blip": _load_blip}[kind]
    return loader(p, torch.device(device), base, temperature)
