"""Downstream tasks on top of the pretrained VLP model: retrieval, captioning, VQA.

Each task is one package, `vlp/tasks/<name>/`, that owns its params section, training
setup, evaluation, predictor, plots and serving schema (`vlp.tasks.spec`); `TASKS` below
is the one list of them that the stages, the registry, serving and the CLI go through.

A finetuned task model is a directory holding a `VLPModel` (for retrieval, possibly a
dual encoder, `CLIPDualEncoder`; `save_pretrained` layout, with its tokenizer) plus
`task.json` naming the task and its inference settings (image size, and e.g. `rerank_k`,
`beam_size`, `max_length`; for VQA the answer vocabulary, with `answer_head.safetensors`). `vlp.tasks.predictor.load_predictor(model_dir)` turns such a
directory into the task's `Predictor`, the one inference API: `vlp evaluate` scores it, the registry's pyfunc
serves it.

- every predictor has `task` and `embed_images(images) -> [N, E]`, `embed_texts(texts) ->
  [M, E]` (L2-normalised ITC features) and `score(images, texts) -> [N, M]`;
- retrieval: `score` is ITM-reranked (ITC top-k per image and per text, k =
  `rerank_k`), other tasks return plain ITC cosine scores;
- captioning: `caption(images) -> list[str]` (beam search);
- vqa: `answer(images, questions) -> list[str]` (one question per image).

Images are `PIL.Image`s of any size and mode; they become pixels through the evaluation
transform the model was trained with, exactly as the torch datasets make them
(`vlp.data.images`): the image processor saved in the model directory
(`preprocessor_config.json`) if it has one, else `image_transform` (resize mode, mean/std)
at `image_size`, both recorded in `task.json`.

`model_sha256(model_dir)` is the directory's content hash: evaluation records it beside
the scores, and the registry only accepts scores measured on the directory it registers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# Light to import (no torch, not even lazily): `vlp.config` reads the tasks' params classes
# from here, and every stage's code deps follow from what it imports (tests/test_dvc_deps.py).
from vlp.errors import ConfigError, VlpError
from vlp.tasks.captioning import TASK as CAPTIONING
from vlp.tasks.retrieval import TASK as RETRIEVAL
from vlp.tasks.spec import Task
from vlp.tasks.vqa import TASK as VQA

TASKS: dict[str, Task] = {t.name: t for t in (RETRIEVAL, CAPTIONING, VQA)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
TASK_FILE = "task.json"


def get_task(name: str, error: type[VlpError] = ConfigError) -> Task:
    """The task called `name`; `error` naming it and the known tasks otherwise."""
    if name not in TASKS:
        raise error(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def read_task_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `task.json` of a finetuned model directory, with its task's inference settings.

    ConfigError naming the file if it is absent, malformed or lacks a setting.
    """
    from vlp.io import load_json

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
    it (`vlp.data.images.saved_transform`); otherwise by the `ImageTransform` task.json
    records. A model without `image_transform` predates it and was trained with the bicubic
    square resize and mean = std = 0.5.
    """
    from vlp.data.images import ImageTransform, saved_transform

    recorded = info.get(
        "image_transform", {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    )
    recorded = {**recorded, "size": info["image_size"]}
    if model_dir is None:
        return ImageTransform.from_dict(recorded)
    return saved_transform(model_dir, recorded)


def model_sha256(model_dir: str | os.PathLike) -> str:
    """Content hash (hex sha256) of a task model directory: weights, configs, tokenizer, task.json.

    The sha256 of the `sha256sum`-style listing `<file sha256>  <relative path>` of every
    file, in sorted path order: it changes with any byte or file name, not with the
    directory's location or the files' timestamps.
    """
    root = Path(model_dir)
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    listing = hashlib.sha256()
    for rel, path in files:
        with path.open("rb") as f:
            listing.update(f"{hashlib.file_digest(f, 'sha256').hexdigest()}  {rel}\n".encode())
    return listing.hexdigest()


__all__ = [
    "TASKS",
    "TASK_FILE",
    "TASK_NAMES",
    "Task",
    "get_task",
    "image_transform",
    "model_sha256",
    "read_task_info",
]
