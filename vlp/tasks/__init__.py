"""Downstream tasks on top of the pretrained VLP model: retrieval, captioning, VQA, generation.

Each task is one package, `vlp/tasks/<name>/`, that owns its params section, training
setup, evaluation, predictor, plots and serving schema (`vlp.tasks.spec`); `TASKS` below
is the one list of them that the stages, the registry, serving and the CLI go through.

A finetuned task model is a model directory of any family (`vlp.models.family`) plus
`task.json` (`TASK_FILE`) naming the task and its inference settings (image size, and e.g.
`rerank_k`, `beam_size`, `max_length`; for VQA the answer vocabulary, with
`answer_head.safetensors`). `vlp.tasks.predictor.load_predictor(model_dir)` turns such a
directory into the task's `Predictor`, the one inference API: `vlp evaluate` scores it, the
registry's pyfunc serves it.

- every predictor has `task` and `embed_images(images) -> [N, E]`, `embed_texts(texts) ->
  [M, E]` (L2-normalised ITC features) and `score(images, texts) -> [N, M]`;
- retrieval: `score` is ITM-reranked (ITC top-k per image and per text, k =
  `rerank_k`), other tasks return plain ITC cosine scores;
- captioning: `caption(images) -> list[str]` (beam search);
- vqa: `answer(images, questions) -> list[str]` (one question per image);
- generation: `generate(prompts) -> list[PIL.Image]` (the best of `num_candidates` samples
  per prompt by the model's own ITM or ITC score); its model directory also holds
  `generator/`, the diffusion generator conditioned on the directory's text encoder.

Reading a task model directory (its `task.json`, its image transform) is the model loader's
job (`vlp.models.checkpoints`).

`model_sha256(model_dir)` is the directory's content hash: evaluation records it beside
the scores, and the registry only accepts scores measured on the directory it registers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Light to import (no torch, not even lazily): `vlp.config` reads the tasks' params classes
# from here, and every stage's code deps follow from what it imports (tests/test_dvc_deps.py).
from vlp.errors import ConfigError, VlpError
from vlp.tasks.captioning import TASK as CAPTIONING
from vlp.tasks.generation import TASK as GENERATION
from vlp.tasks.retrieval import TASK as RETRIEVAL
from vlp.tasks.spec import Task
from vlp.tasks.vqa import TASK as VQA

TASKS: dict[str, Task] = {t.name: t for t in (RETRIEVAL, CAPTIONING, VQA, GENERATION)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
TASK_FILE = "task.json"


def get_task(name: str, error: type[VlpError] = ConfigError) -> Task:
    """The task called `name`; `error` naming it and the known tasks otherwise."""
    if name not in TASKS:
        raise error(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def finetuned_name(task: str, init: str = "pretrained") -> str:
    """The folder of a finetuned model inside a models folder: `<task>-<init>`.

    The same `<task>-<init>` that names its DVC stage (`finetune@<task>-<init>`).
    """
    return f"{task}-{init}"


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
    "finetuned_name",
    "get_task",
    "model_sha256",
]
