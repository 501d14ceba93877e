"""Scoring a task model under training on the `val` split, with the task's own evaluation.

`finetune.<task>.val_every` > 0 turns on model selection (`vlp.train.selection`): the
`finetune` stage scores the model every `val_every` optimizer steps on the `val` split of
`data.root` and keeps the best weights. Each scoring writes the model as it stands into a
task model directory in the run's work folder, loads it with `load_predictor` and scores it
with the task's `evaluate`, as `vlp evaluate` scores the finished model on `evaluate.split`:
the val score is the score of exactly what would ship. Scoring leaves every RNG as it found
it, so training goes on as it would have without it.

A dataset without `val` rows, or a `val` split that is also trained on
(`finetune.splits`), is refused before anything trains. Generation's val score samples
`evaluate.generation_prompts` prompts `num_candidates` times each: the costliest of the
tasks, to be spaced out with a larger `val_every`.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError
from vlp.tasks import get_task

if TYPE_CHECKING:
    import torch

    from vlp.config import Config
    from vlp.train.selection import SelectionSettings

VAL_SPLIT = "val"


def selection_settings(cfg: Config, task: str) -> SelectionSettings | None:
    """The model selection `finetune.<task>` asks for (None: off), checked against the data.

    ConfigError when `val` is also a training split; DataError when `data.root` has no
    `val` rows in the manifest the task's evaluation reads.
    """
    from vlp.data.manifest import require_splits
    from vlp.train.selection import SelectionSettings

    tcfg, spec = cfg.finetune.task(task), get_task(task)
    key = f"finetune.{task}"
    if tcfg.val_every < 0:
        raise ConfigError(f"{key}.val_every: must be >= 0 (0: no model selection)")
    if tcfg.val_every == 0:
        return None
    if VAL_SPLIT in cfg.finetune.splits:
        raise ConfigError(
            f"{key}.val_every: the {VAL_SPLIT!r} split is also in finetune.splits; a model "
            "selected on its own training data is not selected; drop it from one of them"
        )
    require_splits(cfg.data.root, VAL_SPLIT, f"{key}.val_every", f"{task} rows", spec.eval_manifest)
    metric = tcfg.val_metric or spec.primary_metric
    maximise = metric not in spec.lower_is_better
    return SelectionSettings(tcfg.val_every, metric, tcfg.early_stopping_patience, maximise)


def val_scorer(
    cfg: Config,
    task: str,
    module: torch.nn.Module,
    write_model: Callable[[Any, Path], None],
    work: Path,
) -> Callable[[int], dict[str, float]]:
    """`score(step)`: the metrics of `module` as it stands on the `val` split of `data.root`.

    `write_model(module, dir)` writes a task model directory (weights, image processor,
    `task.json`), as the stage writes its final model; a copy of `module` is written, so the
    module under training keeps its device and state.
    """
    from vlp.tasks.predictor import load_predictor
    from vlp.train.checkpoint import rng_state, set_rng_state

    val_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, split=VAL_SPLIT))
    evaluate = get_task(task).module().evaluate

    def score(step: int) -> dict[str, float]:
        state = rng_state()
        device = next(module.parameters()).device
        model_dir = Path(work) / "val-model"
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        write_model(copy.deepcopy(module), model_dir)
        predictor = load_predictor(model_dir, device=device, batch_size=cfg.evaluate.batch_size)
        metrics = evaluate(val_cfg, predictor, Path(cfg.data.root)).metrics
        set_rng_state(state)
        return metrics

    return score
