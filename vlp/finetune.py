"""The `finetune` stage: one model per task, from the pretrained checkpoint or from scratch.

`finetune(cfg, task, init)` trains on the "train" (and "restval") split of `data.root` with the shared loop
(`vlp.train.loop.train`) and writes a finetuned task model directory (see `vlp.tasks`):

- pretrained init -> `finetune.out_dir/<task>`; scratch init -> `finetune.out_dir/<task>_scratch`
  (the ablation: same architecture, tokenizer and budget, weights freshly initialised);
- `plots/finetune_<task>_<init>.csv`: the per-step loss curve;
- an MLflow stage run `finetune-<task>-<init>` with every step's losses.

Objectives: retrieval ITC + ITM (hard negatives), captioning LM, VQA soft-score BCE on an
answer head (`vlp.tasks.vqa`). With `finetune.ablation: false` the scratch run only writes
a marker directory, so the DVC stage's output still exists.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from vlp.config import TASKS, Config
from vlp.errors import ConfigError
from vlp.io import atomic_dir, atomic_write_text, check_replaceable, scratch_dir
from vlp.models.objectives import ObjectiveWeights, VLPObjective

INITS = ("pretrained", "scratch")
RETRIEVAL_LOSS_WEIGHTS = ObjectiveWeights(itc=1.0, itm=1.0, lm=0.0)
SKIPPED_FILE = "ABLATION_OFF"
# Karpathy splits put part of COCO val into "restval", which is training data too.
TRAIN_SPLITS = ("train", "restval")


def model_dir(cfg: Config, task: str, init: str = "pretrained") -> Path:
    """Where `finetune(cfg, task, init)` writes its model."""
    name = task if init == "pretrained" else f"{task}_{init}"
    return Path(cfg.finetune.out_dir) / name


def loss_curve_path(cfg: Config, task: str, init: str) -> Path:
    """The per-step loss CSV of one finetuning run (a DVC plot)."""
    return Path(cfg.evaluate.plots_dir) / f"finetune_{task}_{init}.csv"


def is_skipped(path: Path) -> bool:
    """Whether a model directory is the placeholder written while the ablation is off."""
    return (Path(path) / SKIPPED_FILE).exists()


def _check(task: str, init: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


def base_model(cfg: Config, init: str) -> Any:
    """The starting VLPModel: the pretrained one, or fresh weights with its tokenizer.

    The scratch model keeps the pretrained model's architecture and tokenizer so that the
    two differ only in their weights, which is what the ablation measures.
    """
    from vlp.config import ModelConfig
    from vlp.models import VLPModel, build_model, load_tokenizer
    from vlp.models.vlp_model import CONFIG_NAME, TOKENIZER_DIR

    src = Path(cfg.pretrain.out_dir)
    if not src.is_dir():
        raise ConfigError(
            f"pretrain.out_dir: {src} does not exist; run `vlp pretrain` (or `dvc repro pretrain`)"
        )
    if init == "pretrained":
        return VLPModel.from_pretrained(src)
    tokenizer = load_tokenizer(src / TOKENIZER_DIR, f"{src}/{TOKENIZER_DIR}")
    model_cfg = ModelConfig(**json.loads((src / CONFIG_NAME).read_text())["model"])
    torch.manual_seed(cfg.seed)
    return build_model(model_cfg, tokenizer, temperature=cfg.pretrain.temperature)


def task_setup(
    cfg: Config, task: str, vlp: Any, init: str = "pretrained"
) -> tuple[torch.nn.Module, Any, Any, dict]:
    """(trainable module, train dataset, collate_fn, extra task.json fields) for a task."""
    from vlp.data.torch_data import PairsDataset, VQADataset, make_pretrain_collate

    data, size, max_len = cfg.data.root, cfg.data.image_size, cfg.model.max_text_length
    tcfg = cfg.finetune.task(task)
    if task == "retrieval":
        dataset = PairsDataset(data, TRAIN_SPLITS, size)
        return (
            VLPObjective(vlp, RETRIEVAL_LOSS_WEIGHTS),
            dataset,
            make_pretrain_collate(vlp.tokenizer, max_len),
            {"rerank_k": tcfg.rerank_k},
        )
    if task == "captioning":
        from vlp.tasks.captioning import CAPTION_LOSS_WEIGHTS

        dataset = PairsDataset(data, TRAIN_SPLITS, size)
        return (
            VLPObjective(vlp, CAPTION_LOSS_WEIGHTS),
            dataset,
            make_pretrain_collate(vlp.tokenizer, max_len),
            {
                "beam_size": tcfg.beam_size,
                "max_length": tcfg.max_length,
            },
        )
    from vlp.tasks.vqa import VQAModel, build_answer_vocab, make_vqa_collate

    dataset = VQADataset(data, TRAIN_SPLITS, size)
    answers = build_answer_vocab(dataset.frame["answers"], tcfg.max_answers)
    torch.manual_seed(cfg.seed + 1)  # the head's init: same for both inits, reproducible
    module = VQAModel(
        vlp,
        answers,
        head_lr_multiplier=tcfg.head_lr_multiplier,
        freeze_image_norm=init == "pretrained",
        freeze_encoders=tcfg.freeze_encoders,
        answer_layers=tcfg.answer_layers,
        answer_heads=tcfg.answer_heads,
    )
    extra = {"answers": answers, "freeze_encoders": tcfg.freeze_encoders, **module.architecture()}
    return module, dataset, make_vqa_collate(vlp.tokenizer, max_len, answers), extra


def loss_csv(history: list[dict[str, float]]) -> str:
    """CSV text of step, loss and every loss_* column of a training history."""
    keys = sorted({k for h in history for k in h if k.startswith("loss_")})
    cols = ["step", "loss", *keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for h in history:
        writer.writerow({k: h.get(k, "") for k in cols})
    return buf.getvalue()


def _write_skipped(cfg: Config, out: Path, task: str) -> Path:
    # The DVC stage declares these outputs whatever the params say: write placeholders.
    atomic_write_text(loss_curve_path(cfg, task, "scratch"), "step,loss\n")
    with atomic_dir(out, "finetuned-model") as tmp:
        (tmp / SKIPPED_FILE).write_text("finetune.ablation is false: no scratch model trained\n")
        (tmp / "task.json").write_text(json.dumps({"task": task, "init": "scratch"}) + "\n")
    return out


def finetune(cfg: Config, task: str, init: str = "pretrained") -> Path:
    """Finetune `task` from the pretrained model (or from scratch); return the model dir."""
    from vlp.tracking import check_stage_outputs, stage_run
    from vlp.train.loop import TrainSettings, train

    _check(task, init)
    out = model_dir(cfg, task, init)
    check_stage_outputs(
        cfg,
        {
            "finetune.out_dir": out.parent,
            "evaluate.plots_dir": loss_curve_path(cfg, task, init).parent,
        },
    )
    check_replaceable(out)  # before training, not after
    if init == "scratch" and not cfg.finetune.ablation:
        return _write_skipped(cfg, out, task)
    t0 = time.perf_counter()
    tcfg = cfg.finetune.task(task)
    vlp = base_model(cfg, init)
    module, dataset, collate, extra = task_setup(cfg, task, vlp, init)
    p = cfg.pretrain
    settings = TrainSettings.from_config(
        tcfg,
        seed=cfg.seed,
        device=p.device,
        precision=p.precision,
        max_grad_norm=p.max_grad_norm,
        num_workers=p.num_workers,
        log_every=p.log_every,
        checkpoint_every=0,
        keep_checkpoints=1,
    )
    params = {
        **{f"finetune.{task}.{k}": v for k, v in vars(tcfg).items()},
        "init": init,
        "n_train": len(dataset),
        "num_parameters": sum(x.numel() for x in module.parameters()),
    }
    # Checkpoints only live for the run: the stage output is the final model alone.
    curve = loss_curve_path(cfg, task, init)
    with scratch_dir(out.with_name(f"{out.name}.work")) as work:
        with stage_run(cfg, "finetune", task=task, init=init, params=params) as run:
            log_every = max(p.log_every, 1)

            def on_log(metrics: dict[str, float], step: int) -> None:
                if step % log_every == 0 or step == 1:
                    run.log_metrics(metrics, step=step)

            result = train(module, dataset, collate, settings, work, on_log=on_log)
            info = {
                "task": task,
                "init": init,
                "image_size": cfg.data.image_size,
                "data": str(cfg.data.root),
                "steps": result.steps,
                "final_loss": result.final.get("loss"),
                **extra,
            }
            with atomic_dir(out, "finetuned-model") as tmp:
                vlp.cpu().save_pretrained(tmp)
                if task == "vqa":
                    module.save_head(tmp)
                (tmp / "task.json").write_text(json.dumps(info, indent=2) + "\n")
            atomic_write_text(curve, loss_csv(result.history))
            summary = {
                "steps": result.steps,
                "train_s": result.wall_s,
                "wall_s": time.perf_counter() - t0,
                "samples_per_s": result.samples_per_s,
                "final_loss": result.final["loss"],
            }
            run.log_metrics(summary)
            run.set_tags({"vlp.device": result.device, "vlp.precision": result.precision})
            run.log_artifact(curve)
    print(json.dumps({"task": task, "init": init, "model_dir": str(out), **summary}, indent=2))
    return out
