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

`model_sha256(model_dir)` is the directory's content hash: evaluation records it beside
the scores, and the registry only accepts scores measured on the directory it registers.
"""

from __future__ import annotations

import hashlib
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


def load_predictor(model_dir: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Load a finetuned task model directory as a `Predictor` for its task."""
    from vlp.tasks.predictor import load

    return load(Path(model_dir), device=device)


__all__ = ["TASK_FILE", "load_predictor", "model_sha256", "read_task_info"]
