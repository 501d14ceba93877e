"""What a vlp model directory records besides its weights: its task and its image transform.

A directory the model loader (`vlp.models.family.load_model`) reads is a vlp model directory
or a foreign checkpoint (a transformers CLIPModel or BLIP directory). Images become pixels
through the evaluation transform the model was trained with, exactly as the torch datasets
make them (`vlp.data.images`):

- a finetuned task model (`task.json`, `read_task_info`): the image processor saved in the
  directory (`preprocessor_config.json`) if it has one, else the `ImageTransform` task.json
  records (resize mode, mean/std) at its `image_size` (`image_transform`);
- the pretrained model: `image_transform.json` beside its weights (`IMAGE_TRANSFORM_FILE`);
- a foreign checkpoint: its own image processor (`AutoImageProcessor`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlp.data.images import ImageTransform, saved_transform
from vlp.data.processors import ProcessorTransform
from vlp.errors import ConfigError
from vlp.io import load_json
from vlp.tasks import TASK_FILE, TASKS

# The pretrained model's evaluation transform (`ImageTransform.to_dict`), beside its weights.
IMAGE_TRANSFORM_FILE = "image_transform.json"


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


def directory_transform(
    p: Path, task_info: dict[str, Any] | None, foreign: bool, key: str = "model directory"
) -> Any:
    """The evaluation transform of the model directory `p` (`task_info`: its task.json or None).

    A foreign checkpoint (`foreign`) is preprocessed by its own image processor; a vlp model
    directory by what it records: task.json, else the pretrained model's image_transform.json.
    """
    if foreign:
        return ProcessorTransform.load(p, key)
    if task_info is not None:
        return image_transform(task_info, p)
    path = p / IMAGE_TRANSFORM_FILE
    if not path.is_file():
        raise ConfigError(
            f"{p}: a vlp model without task.json or {IMAGE_TRANSFORM_FILE}: its image "
            "transform is unknown"
        )
    return saved_transform(p, load_json(path, ConfigError))
