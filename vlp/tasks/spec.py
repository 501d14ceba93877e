"""What every downstream task declares about itself; light to import (no torch).

A task is one package, `vlp/tasks/<name>/`: its `__init__.py` holds the config dataclass of
its `finetune.<name>` params section and its `Task` description; the module the
description names (`implementation`) holds the torch side:

- `setup(cfg, vlp, init) -> TrainingSetup`: what `vlp finetune` trains, on which data,
  and the inference settings it records in the model's `task.json`;
- `save(module, model_dir)`: the task model's weights;
- `Predictor`: inference over a saved task model (what `load_predictor`, the registry's
  pyfunc and `vlp evaluate` all use);
- `evaluate(cfg, predictor, data) -> TaskEval`: scores of a predictor on `evaluate.split`;
- optionally `not_applicable(cfg, init) -> str | None`: why the task cannot be finetuned
  from `init` under `cfg` (finetune then writes a "not applicable" model directory);
- `serve(predictor, images, texts, params, limits) -> {output column: values}`: the served
  answer to one request, its images decoded, its texts (by input column) checked, `params`
  its request params (`request_params`, defaults filled in) and `limits` the `serving`
  limits it was registered with.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal


@dataclass
class FinetuneBudget:
    """The training budget every `finetune.<task>` params section has."""

    epochs: int
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    # model selection on the `val` split (vlp.tasks.validation): score every val_every
    # optimizer steps (0: off) by val_metric (None: the task's primary metric), keep the best
    # weights, stop after early_stopping_patience scorings without improvement (0: never)
    val_every: int
    val_metric: str | None
    early_stopping_patience: int
    # decay of an exponential moving average of the weights, which the saved model gets;
    # None or 0: off
    ema_decay: float | None


# The parameter-efficient adapters `finetune.<task>.adapter` names (peft): LoRA, and DoRA
# (LoRA with a learned magnitude per output, `LoraConfig(use_dora=True)`).
AdapterName = Literal["lora", "dora"]
ADAPTERS: tuple[str, ...] = typing.get_args(AdapterName)


@dataclass
class AdaptedBudget(FinetuneBudget):
    """A training budget plus an optional peft adapter: only the adapter (and a head the
    task adds) trains, the model's own weights stay as the pretrained model has them."""

    adapter: AdapterName | None  # None: the whole model finetunes
    lora_rank: int
    lora_alpha: float  # scale = lora_alpha / lora_rank
    lora_dropout: float
    lora_targets: list[str] | None  # module names adapted; None: the family's `lora_targets`


@dataclass(frozen=True)
class Task:
    """One downstream task: its params, inference settings, metrics, plots and serving schema."""

    name: str
    config: type[FinetuneBudget]  # the dataclass of its `finetune.<name>` params section
    settings: tuple[str, ...]  # inference settings `task.json` must hold besides image_size
    primary_metric: str  # on top of metrics/<name>.json; gates promotion in the registry
    plot: str  # evaluation plot: `plots/<name>_<plot>_<init>.csv` ...
    plot_columns: tuple[str, ...]  # ... with these columns
    inputs: tuple[tuple[str, str], ...]  # served request columns: (name, MLflow type)
    output: tuple[str, str]  # served response column: (name, MLflow type)
    implementation: str  # module with setup, save, Predictor, evaluate, serve (imports torch)
    # `evaluate` params section settings the task's scores depend on (recorded with them)
    evaluate_options: tuple[str, ...] = ()
    # whether its pyfunc also answers `params={"output": "embedding"}` requests
    embeddings: bool = False
    # request params of its pyfunc: (name, MLflow type); each defaults to the `task.json`
    # setting of that name and is bounded by the `serving` limits (`serve` checks them)
    request_params: tuple[tuple[str, str], ...] = ()
    # the promotion gate where the evaluation data gives no primary_metric (generation on
    # captions its scene parser cannot read); None: there is always a primary_metric
    fallback_metric: str | None = None
    # its metrics where lower is better (ranks, distances): model selection minimises them
    lower_is_better: tuple[str, ...] = ()
    # the manifest (vlp.data.manifest) whose rows of `evaluate.split` its `evaluate` scores
    eval_manifest: str = "pairs.parquet"
    # module whose `zeroshot(cfg, model_dir, data_dir, *, split, precision, batch_size,
    # answers)` measures a checkpoint untrained on the task (`vlp zeroshot --task`); None:
    # `vlp.zeroshot` measures it (retrieval) or nothing does
    zeroshot: str | None = None

    def zeroshot_module(self) -> ModuleType:
        """The module measuring the task zero-shot (`zeroshot` must be set; imports torch)."""
        assert self.zeroshot is not None, f"{self.name} has no zero-shot module"
        return importlib.import_module(self.zeroshot)

    def gate_metric(self, metrics: dict[str, Any]) -> str:
        """The metric that gates promotion for an evaluation's `metrics` (top level or under
        `pretrained`): `primary_metric` where they have it, else `fallback_metric`."""
        for node in (metrics, metrics.get("pretrained")):
            if isinstance(node, dict) and self.primary_metric in node:
                return self.primary_metric
        return self.fallback_metric or self.primary_metric

    def module(self) -> ModuleType:
        """The task's torch side (imported on first use)."""
        return importlib.import_module(self.implementation)


@dataclass
class TrainingSetup:
    """What `vlp finetune` trains for a task: `train(module, dataset, collate)`.

    `info`: the inference settings the task records in the model's `task.json`.
    """

    module: Any  # torch.nn.Module whose forward(**batch) returns {"loss": ...}
    dataset: Any  # torch Dataset of the train splits
    collate: Any  # its DataLoader collate_fn
    info: dict[str, Any]


@dataclass
class Example:
    """One qualitative example: an image file, what is asked, the truth and the prediction."""

    image_path: Path
    ground_truth: list[str]
    prediction: str
    query: str = ""


@dataclass
class TaskEval:
    """What evaluating one model produced."""

    metrics: dict[str, float]
    results: Any  # JSON-serialisable results file content
    plot_rows: list[dict[str, Any]]
    examples: list[Example] = field(default_factory=list)
    # more qualitative files (e.g. a gallery of generated images): name -> content, written
    # as `results/<task>/<stem>_<init><suffix>` and logged with the examples
    files: dict[str, bytes] = field(default_factory=dict)
