"""The `finetune` stage: one model per task, from the pretrained checkpoint or from scratch.

`finetune(cfg, task, init)` trains on the `finetune.splits` of `data.root` (default `train`
and Karpathy's `restval`) with the shared loop (`vlp.train.loop.train`) and writes a
finetuned task model directory (see `vlp.tasks`):

- pretrained init (from `finetune.init_dir`) -> `finetune.out_dir/<task>-pretrained`; scratch
  init -> `finetune.out_dir/<task>-scratch` (the ablation: same architecture, tokenizer and budget,
  weights freshly initialised);
- `<runtime.plots_dir>/finetune_<task>_<init>.csv`: the per-step loss curve;
- `<runtime.plots_dir>/finetune_<task>_<init>_val.csv`: the val curve of model selection
  (`finetune.<task>.val_every` > 0, `vlp.tasks.validation`): the selection metric on the
  `val` split at every scoring; the model saved is then the best-scoring one, and
  `task.json` and the run record its step and value (header only while selection is off);
- an MLflow stage run `finetune-<task>-<init>` with every step's losses, tagged with the
  content hashes of what it read: the starting model (`vlp.input.init`) and the dataset
  (`vlp.input.data`).

Both inits preprocess images as the pretrained model does: with the image processor it keeps
(`preprocessor_config.json`, saved into the finetuned model too), else the `images` params.

What each task trains, and the inference settings it records in `task.json`, is the
task's own (`setup` in `vlp.tasks.<task>`): retrieval ITC + ITM (hard negatives),
captioning LM, VQA soft-score BCE on an answer decoder, generation the denoising loss of a
diffusion generator. With `finetune.ablation: false` the scratch run only writes
a marker directory, so the DVC stage's output still exists.

The pretrained model's family (`vlp.models.family`) decides what it can be finetuned for: a
dual encoder (`model.family: clip`) does retrieval, trained with CLIP's contrastive loss, and
generation; the generative families (`encoder-decoder`, `t5`) caption and write VQA
answers (`vlp.tasks.vqa.generative`). For a task its family does not do it writes a "not
applicable" model directory (the reason in `NOT_APPLICABLE`, `task.json` with
`applicable: false`) and an empty loss curve, records an
MLflow run tagged `vlp.applicable: false`, and succeeds; `vlp evaluate` and `vlp register`
carry the verdict on. A task may also rule out one init (`init_not_applicable`: generation
from a user's diffusers pipeline has no scratch ablation); `vlp evaluate` then scores the
other alone.

Under `torchrun` training is data parallel across ranks and rank 0 alone writes files
(model directory, loss curve, checkpoints in its work folder) and the MLflow run.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlp.config import Config
from vlp.data.images import image_params, image_transforms
from vlp.data.processors import ProcessorTransform
from vlp.errors import ConfigError
from vlp.io import atomic_dir, atomic_write_csv, check_replaceable, scratch_dir
from vlp.tasks import TASK_FILE, finetuned_name, get_task
from vlp.tasks.validation import selection_settings, val_scorer
from vlp.train.adapters import peak_memory_mb
from vlp.train.distributed import barrier, distributed
from vlp.train.selection import CURVE_COLUMNS, ModelSelection, SelectionSettings

INITS = ("pretrained", "scratch")
SKIPPED_FILE = "ABLATION_OFF"
NOT_APPLICABLE_FILE = "NOT_APPLICABLE"


def model_dir(cfg: Config, task: str, init: str = "pretrained") -> Path:
    """Where `finetune(cfg, task, init)` writes its model."""
    return Path(cfg.finetune.out_dir) / finetuned_name(task, init)


def loss_curve_path(cfg: Config, task: str, init: str) -> Path:
    """The per-step loss CSV of one finetuning run (a DVC plot)."""
    return Path(cfg.runtime.plots_dir) / f"finetune_{task}_{init}.csv"


def val_curve_path(cfg: Config, task: str, init: str) -> Path:
    """The val curve CSV of one finetuning run (a DVC plot; header only without selection)."""
    return Path(cfg.runtime.plots_dir) / f"finetune_{task}_{init}_val.csv"


def is_skipped(path: Path) -> bool:
    """Whether a model directory is the placeholder written while the ablation is off."""
    return (Path(path) / SKIPPED_FILE).exists()


def not_applicable(path: Path) -> str | None:
    """Why a model directory holds no model because its task does not apply, or None."""
    marker = Path(path) / NOT_APPLICABLE_FILE
    return marker.read_text().strip() if marker.exists() else None


def _check(task: str, init: str) -> None:
    get_task(task)
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


def base_model(cfg: Config, init: str) -> Any:
    """The starting model (VLPModel or CLIPDualEncoder): the pretrained one, or fresh weights
    with its tokenizer.

    The scratch model keeps the pretrained model's architecture and tokenizer so that the
    two differ only in their weights, which is what the ablation measures.
    """
    from vlp.models.family import fresh_model, load_model

    src = _init_dir(cfg)
    if init == "pretrained":
        return load_model(src).model
    torch.manual_seed(cfg.seed)
    return fresh_model(src, temperature=cfg.model.temperature)


def init_not_applicable(cfg: Config, task: str, init: str) -> str | None:
    """Why `task` cannot be finetuned from `init` under `cfg` (its module's optional
    `not_applicable`), or None."""
    check = getattr(get_task(task).module(), "not_applicable", None)
    return None if check is None else check(cfg, init)


def _init_dir(cfg: Config) -> Path:
    src = Path(cfg.finetune.init_dir)
    if not src.is_dir():
        raise ConfigError(
            f"finetune.init_dir: {src} does not exist; run `vlp pretrain` (or `dvc repro pretrain`)"
        )
    return src


def read_inputs(cfg: Config, data: bool = True) -> dict[str, tuple[str, str]]:
    """What a finetune run reads, by content hash (`stage_run` inputs): the starting model
    (`finetune.init_dir`) and, when `data`, the dataset."""
    from vlp.data.manifest import dataset_hash
    from vlp.tasks import model_sha256

    src = _init_dir(cfg)
    inputs = {"init": (str(src), model_sha256(src))}
    if data:
        inputs["data"] = (cfg.data.root, dataset_hash(cfg.data.root))
    return inputs


def loss_columns(history: list[dict[str, float]]) -> list[str]:
    """The loss curve's columns: step, loss and every loss_* a training history has."""
    return ["step", "loss", *sorted({k for h in history for k in h if k.startswith("loss_")})]


def _write_skipped(cfg: Config, out: Path, task: str) -> Path:
    # The DVC stage declares these outputs whatever the params say: write placeholders.
    atomic_write_csv(loss_curve_path(cfg, task, "scratch"), ["step", "loss"], [])
    atomic_write_csv(val_curve_path(cfg, task, "scratch"), CURVE_COLUMNS, [])
    with atomic_dir(out, "finetuned-model") as tmp:
        (tmp / SKIPPED_FILE).write_text("finetune.ablation is false: no scratch model trained\n")
        (tmp / TASK_FILE).write_text(json.dumps({"task": task, "init": "scratch"}) + "\n")
    return out


def _write_not_applicable(cfg: Config, out: Path, task: str, init: str, reason: str) -> Path:
    """The declared outputs of a task the pretrained model does not do, and a tagged run."""
    from vlp.tracking import stage_run

    print(f"finetune {task} ({init}): not applicable: {reason}")
    atomic_write_csv(loss_curve_path(cfg, task, init), ["step", "loss"], [])
    atomic_write_csv(val_curve_path(cfg, task, init), CURVE_COLUMNS, [])
    with atomic_dir(out, "finetuned-model") as tmp:
        (tmp / NOT_APPLICABLE_FILE).write_text(reason + "\n")
        info = {"task": task, "init": init, "applicable": False, "reason": reason}
        (tmp / TASK_FILE).write_text(json.dumps(info) + "\n")
    tags = {"vlp.applicable": "false", "vlp.not_applicable_reason": reason}
    inputs = read_inputs(cfg, data=False)  # the family that rules the task out
    with stage_run(cfg, "finetune", task=task, init=init, tags=tags, inputs=inputs):
        pass  # the run itself is the record: tagged not applicable, nothing trained
    return out


def _check_outputs(cfg: Config, task: str, init: str) -> Path:
    """Refuse a bad task, init, split or output path before anything trains; return the model dir."""
    from vlp.data.manifest import check_split_names
    from vlp.tracking import check_stage_outputs

    _check(task, init)
    check_split_names(cfg.finetune.splits, "finetune.splits")
    out = model_dir(cfg, task, init)
    check_stage_outputs(
        cfg,
        {
            "finetune.out_dir": out.parent,
            "runtime.plots_dir": loss_curve_path(cfg, task, init).parent,
        },
    )
    check_replaceable(out)  # before training, not after
    return out


def _write_model(
    module: Any,
    tmp: Path,
    task: str,
    init: str,
    setup: Any,
    transform: Any,
    adapter: Any = None,
    **info: Any,
) -> None:
    """Write a task model directory (weights, image processor, `TASK_FILE` with `info`; with
    a peft `adapter`, the base's weights and the adapter in peft's format)."""
    from vlp.models.adapters import save_adapter

    task_info = {
        "task": task,
        "init": init,
        "image_size": transform.size,
        # the evaluation transform (its size is image_size): predictors and serving
        "image_transform": {k: v for k, v in transform.to_dict().items() if k != "size"},
        **info,
        **setup.info,
    }
    save = partial(get_task(task).module().save, module)
    if adapter is None:
        save(tmp)
    else:
        save_adapter(adapter, tmp, save)
    if isinstance(transform, ProcessorTransform):
        transform.save(tmp)  # preprocessor_config.json, beside the weights
    (tmp / TASK_FILE).write_text(json.dumps(task_info, indent=2) + "\n")


def _save_model(
    cfg: Config,
    out: Path,
    task: str,
    init: str,
    setup: Any,
    transform: Any,
    result: Any,
    adapter: Any = None,
) -> None:
    """Write the finetuned task model directory; `result.extra` adds model selection's record."""
    info = {
        "data": str(cfg.data.root),
        "steps": result.steps,
        "final_loss": result.final.get("loss"),
    }
    with atomic_dir(out, "finetuned-model") as tmp:
        _write_model(
            setup.module, tmp, task, init, setup, transform, adapter, **info, **result.extra
        )


def _log_results(
    cfg: Config,
    run: Any,
    out: Path,
    task: str,
    init: str,
    result: Any,
    wall_s: float,
    val_rows: list[dict[str, Any]],
) -> None:
    """Write the loss and val curves, log them and the run's summary to `run`, and print it."""
    curve = loss_curve_path(cfg, task, init)
    atomic_write_csv(curve, loss_columns(result.history), result.history)
    val_curve = val_curve_path(cfg, task, init)
    atomic_write_csv(val_curve, CURVE_COLUMNS, val_rows)
    selected = {k: v for k, v in result.extra.items() if isinstance(v, int | float)}
    summary = {
        "steps": result.steps,
        "train_s": result.wall_s,
        "wall_s": wall_s,
        "samples_per_s": result.samples_per_s,
        "final_loss": result.final["loss"],
        "peak_memory_mb": peak_memory_mb(result.device),
        **selected,  # model selection's best step and value
    }
    run.log_metrics(summary)
    run.set_tags({"vlp.device": result.device, "vlp.precision": result.precision})
    run.log_artifact(curve)
    run.log_artifact(val_curve)
    report = {"task": task, "init": init, "model_dir": str(out), **summary}
    print(json.dumps(report, indent=2))


def _model_selection(
    cfg: Config,
    task: str,
    init: str,
    trained: tuple[Any, Any],
    transform: Any,
    work: Path,
    run: Any,
    settings: SelectionSettings | None,
    dist_info: Any,
) -> ModelSelection | None:
    """Model selection on the `val` split (`vlp.tasks.validation`), or None when it is off.

    `trained`: (the task's training setup, its peft adapter or None)."""
    if settings is None:
        return None
    setup, adapter = trained

    def write(module: Any, tmp: Path) -> None:
        _write_model(module, tmp, task, init, setup, transform, adapter, data=str(cfg.data.root))

    def log(scoring: Any) -> None:
        val = {f"val.{k}": v for k, v in scoring.metrics.items() if isinstance(v, int | float)}
        run.log_metrics(val, step=scoring.step)
        mark = " (best)" if scoring.best else ""
        print(f"val step {scoring.step}: {settings.metric} {scoring.value:.4f}{mark}")

    return ModelSelection(
        settings,
        setup.module,
        val_scorer(cfg, task, setup.module, write, work),
        is_main=dist_info.is_main,
        world_size=dist_info.world_size,
        on_score=log if run is not None else None,
    )


def finetune(cfg: Config, task: str, init: str = "pretrained") -> Path:
    """Finetune `task` from the pretrained model (or from scratch); return the model dir."""
    from vlp.models.adapters import trainable_parameters
    from vlp.tracking import stage_run
    from vlp.train.adapters import reset_peak_memory, task_adapter
    from vlp.train.loop import TrainSettings, train

    out = _check_outputs(cfg, task, init)
    with distributed() as info:
        from vlp.models.family import model_family, task_not_applicable

        reason = task_not_applicable(model_family(_init_dir(cfg)), task)
        reason = reason or init_not_applicable(cfg, task, init)
        if reason is not None:
            if info.is_main:
                _write_not_applicable(cfg, out, task, init, reason)
            barrier()
            return out
        if init == "scratch" and not cfg.finetune.ablation:
            if info.is_main:
                _write_skipped(cfg, out, task)
            barrier()
            return out
        selection = selection_settings(cfg, task)  # refuses a missing val split before training
        t0 = time.perf_counter()
        tcfg = cfg.finetune.task(task)
        if selection is not None and tcfg.ema_decay:
            raise ConfigError(
                f"finetune.{task}.ema_decay: model selection (val_every) keeps the best raw "
                "weights, the EMA replaces them at the end: use one or the other"
            )
        inputs = read_inputs(cfg) if info.is_main else {}  # hashed before anything is loaded
        vlp = base_model(cfg, init)
        # the pretrained model's image processor if it keeps one (both inits: the ablation
        # changes the weights alone); each task's setup trains with this same transform
        transform = image_transforms(cfg, cfg.finetune.init_dir)[0]
        setup = get_task(task).module().setup(cfg, vlp, init)
        module, dataset = setup.module, setup.dataset
        adapter = task_adapter(task, tcfg, vlp, module)  # None: the whole model trains
        trainable, total = trainable_parameters(module)
        print(f"finetune {task} ({init}): {trainable:,} of {total:,} parameters train")
        settings = TrainSettings.from_config(
            cfg.runtime, tcfg, seed=cfg.seed, checkpoint_every=0, keep_checkpoints=1
        )
        params = {
            **{f"finetune.{task}.{k}": v for k, v in vars(tcfg).items()},
            "finetune.splits": cfg.finetune.splits,
            "init": init,
            **image_params(transform),
            "n_train": len(dataset),
            "num_parameters": total,
            "num_trainable_parameters": trainable,
            "world_size": info.world_size,
        }
        work_name = out.with_name(f"{out.name}.work")
        # Checkpoints only live for the run: the stage output is the final model alone. The
        # loop writes them from rank 0 alone, so the other ranks get a path they never create.
        work_ctx = scratch_dir(work_name) if info.is_main else nullcontext(work_name)
        run_ctx = (
            stage_run(cfg, "finetune", task=task, init=init, params=params, inputs=inputs)
            if info.is_main
            else nullcontext(None)
        )
        with work_ctx as work, run_ctx as run:
            log_every = max(cfg.runtime.log_every, 1)

            def on_log(metrics: dict[str, float], step: int) -> None:
                if step % log_every == 0 or step == 1:
                    run.log_metrics(metrics, step=step)

            select = _model_selection(
                cfg, task, init, (setup, adapter), transform, work, run, selection, info
            )
            reset_peak_memory()
            result = train(
                module, dataset, setup.collate, settings, work, on_log=on_log if run else None,
                on_step=select.on_step if select else None,
            )  # fmt: skip
            if select is not None and select.finish(result.steps) is not None:
                result.extra.update(select.summary())  # the best weights are now the module's
            if info.is_main:
                _save_model(cfg, out, task, init, setup, transform, result, adapter)
                val_rows = select.curve() if select else []
                _log_results(cfg, run, out, task, init, result, time.perf_counter() - t0, val_rows)
        barrier()
    return out
