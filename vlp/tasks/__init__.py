"""Downstream tasks on top of the pretrained VLP model: retrieval, captioning, VQA.

A finetuned task model is a directory holding a `VLPModel` (`save_pretrained` layout, with
its tokenizer) plus `task.json` naming the task and its inference settings (and, for VQA,
the answer vocabulary and `answer_head.safetensors`). `load_predictor(model_dir)` turns such
a directory into a `Predictor`, the one inference API the registry's pyfunc wraps:

- every predictor has `task` and `embed_images(images) -> [N, E]`, `embed_texts(texts) ->
  [M, E]` (L2-normalised ITC features) and `score(images, texts) -> [N, M]`;
- retrieval: `score` is ITM-reranked (ITC top-k per image and per text, k =
  `rerank_k`), other tasks return plain ITC cosine scores;
- captioning: `caption(images) -> list[str]` (beam search);
- vqa: `answer(images, questions) -> list[str]` (one question per image).

Images are `PIL.Image`s of any size and mode; they are converted to RGB and resized to the
model's training resolution exactly as the torch datasets do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.config import TASKS
from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.tasks.predictor import Predictor

TASK_FILE = "task.json"


def read_task_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `task.json` of a finetuned model directory; ConfigError if absent or malformed."""
    path = Path(model_dir) / TASK_FILE
    if not path.exists():
        raise ConfigError(f"{path}: not found; {model_dir} is not a finetuned task model")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("task") not in TASKS:
        raise ConfigError(f"{path}: key 'task' must be one of {', '.join(TASKS)}")
    return info


def load_predictor(model_dir: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Load a finetuned task model directory as a `Predictor` for its task."""
    from vlp.tasks.predictor import load

    return load(Path(model_dir), device=device)


__all__ = ["TASK_FILE", "load_predictor", "read_task_info"]
