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
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.data.images import ImageTransform, saved_transform
from vlp.errors import ConfigError
from vlp.io import load_json
from vlp.models.tokenizer import local_dir
from vlp.tasks import TASK_FILE, TASKS

if TYPE_CHECKING:
    from vlp.config import ModelConfig

# The pretrained model's evaluation transform (`ImageTransform.to_dict`), beside its weights.
IMAGE_TRANSFORM_FILE = "image_transform.json"


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


def read_task_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `task.json` of a finetuned model directory, with its task's inference settings.

    ConfigError naming the file if it is absent, malformed or lacks a setting.
    """
    path = Path(model_dir) / TASK_FILE
    if not path.exists():
        raise ConfigError(f"{path}: not found; {model_dir} is not a finetuned task model")
    info = load_json(path, ConfigError)
    if not isinstance(info, dict) or info.get("task") not in TASKS:
        raise ConfigError(f"{path}: key 'task' must be one of {', '.join(TASKS)}")
    for key in ("image_size", *TASKS[info["task"]].settings):
        if key not in info:
            raise ConfigError(f"{path}: lacks the {info['task']} setting {key!r}")
    if not isinstance(info["image_size"], int) or info["image_size"] < 1:
        raise ConfigError(f"{path}: image_size must be a positive integer")
    if not isinstance(info.get("image_transform", {}), dict):
        raise ConfigError(f"{path}: image_transform must be a mapping")
    return info


def image_transform(info: dict[str, Any], model_dir: str | os.PathLike | None = None) -> Any:
    """The evaluation transform of a task model: its `task.json` (`info`) and directory.

    A model directory with an image processor (`preprocessor_config.json`) is preprocessed by
    it (`saved_transform`); otherwise by the `ImageTransform` task.json
    records. A model without `image_transform` predates it and was trained with the bicubic
    square resize and mean = std = 0.5.
    """
    recorded = info.get(
        "image_transform", {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    )
    recorded = {**recorded, "size": info["image_size"]}
    if model_dir is None:
        return ImageTransform.from_dict(recorded)
    return saved_transform(model_dir, recorded)


def _vlp_transform(p: Path, task_info: dict[str, Any] | None) -> Any:
    if task_info is not None:
        return image_transform(task_info, p)
    path = p / IMAGE_TRANSFORM_FILE
    if not path.is_file():
        raise ConfigError(
            f"{p}: a vlp model without task.json or {IMAGE_TRANSFORM_FILE}: its image "
            "transform is unknown"
        )
    return saved_transform(p, load_json(path, ConfigError))


def _load_vlp(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.models.family import load_model

    task_info = read_task_info(p) if (p / TASK_FILE).is_file() else None
    transform = _vlp_transform(p, task_info)
    return Encoder("vlp", p, load_model(p, device).eval(), transform, task_info)


def _load_clip(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.data.images import ProcessorTransform
    from vlp.models.clip import CLIPDualEncoder

    model = CLIPDualEncoder.from_checkpoint(p, base=None, device=device, key="--model")
    return Encoder("clip", p, model.eval(), ProcessorTransform.load(p, "--model"), None)


def _load_blip(
    p: Path, device: torch.device, base: ModelConfig | None, temperature: float
) -> Encoder:
    from vlp.data.images import ProcessorTransform
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
    return Encoder("blip", p, model.eval(), ProcessorTransform.load(p, "--model"), None)


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
    from vlp.models.family import checkpoint_kind

    p = local_dir(path, "--model")
    kind = checkpoint_kind(p, "--model")
    loader = {"vlp": _load_vlp, "clip": _load_clip, "blip": _load_blip}[kind]
    return loader(p, torch.device(device), base, temperature)
