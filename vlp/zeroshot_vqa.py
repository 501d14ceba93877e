"""`vlp zeroshot --vqa`: a checkpoint answers a split's VQA questions untrained, scored by
vlp's VQA accuracy (`evaluate.vqa_protocol`; the keys `vlp evaluate` writes for VQA).

The checkpoint is either

- a VQA task model (task.json `task: vqa`): it answers as `vlp evaluate` has it answer, with
  its classifier or by writing (`vlp.tasks.vqa.task.Predictor`); or
- a foreign checkpoint of a family that writes answers (`Family.generates_answers`) whose
  answer writer is trained: BLIP's `BlipForQuestionAnswering`, whose answer decoder reads the
  question fused with the image ([ENC] first) and writes greedily at most
  `zeroshot.answer_max_length` tokens, as `BlipForQuestionAnswering.generate` does
  (`VLPModel.generate_answers`). A checkpoint whose writer would start untrained is refused
  with `vlp.models.family.untrained_for`'s reason.

It runs in batches of `zeroshot.batch_size`, under bf16 autocast when the precision resolves
to bf16, and records an MLflow run as `vlp zeroshot` does (mode `vqa`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError, DataError
from vlp.zeroshot import Inference, inference_settings, read_inputs

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config


class CheckpointAnswerer:
    """A checkpoint that writes answers, with the VQA predictor's `transform` and `answer`."""

    def __init__(self, run: Inference, max_length: int) -> None:
        self.run = run
        self.max_length = max_length
        self.transform = run.encoder.transform

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """One written answer per (image, question) pair."""
        model, device, size = self.run.encoder.model, self.run.encoder.device, self.run.batch_size
        out: list[str] = []
        for start in range(0, len(images), size):
            enc = model.tokenize(list(questions[start : start + size]))
            pixels = self.transform.pixels(images[start : start + size]).to(device)
            with self.run.autocast():
                out += model.generate_answers(
                    pixels,
                    enc["input_ids"].to(device),
                    enc["attention_mask"].to(device),
                    self.max_length,
                )
        return out


def load_answerer(
    cfg: Config, model_dir: Path, precision: str | None, batch_size: int | None
) -> tuple[Inference, Any]:
    """(how it runs, what answers: a VQA task model's predictor or a `CheckpointAnswerer`)."""
    from vlp.models.family import load_model, recognise, untrained_for
    from vlp.models.tokenizer import local_dir
    from vlp.tasks import TASKS

    batch_size, device, amp_dtype = inference_settings(cfg, precision, batch_size)
    p = local_dir(model_dir, "--model")
    family, meta = recognise(p, "--model")
    if meta is None:
        if not family.generates_answers:
            raise ConfigError(
                f"--model: {p} holds a model of the {family.name} family "
                f"({family.description}): it writes no answers"
            )
        reason = untrained_for(p, "vqa", "--model")
        if reason is not None:
            raise ConfigError(reason)
    loaded = load_model(p, device, key="--model", temperature=cfg.model.temperature)
    loaded.model.eval()
    run = Inference(loaded, batch_size, amp_dtype)
    info = loaded.task_info
    if meta is None:
        return run, CheckpointAnswerer(run, cfg.zeroshot.answer_max_length)
    if info is None or info.get("task") != "vqa":
        raise ConfigError(
            f"--model: {p} is a vlp model directory but not a VQA task model (task.json "
            "task: vqa): finetune it for VQA first"
        )
    predictor = TASKS["vqa"].module().Predictor(loaded.model, info, p, batch_size)
    return run, predictor


def vqa_zeroshot(
    cfg: Config,
    model_dir: Path,
    data_dir: Path,
    *,
    split: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Answer `data_dir`'s VQA questions of `split` with `model_dir`; record an MLflow run;
    return the scores."""
    from vlp.data.manifest import check_split_names
    from vlp.tasks import model_sha256
    from vlp.tasks.vqa.task import evaluate
    from vlp.tracking import check_stage_outputs, stage_run

    split = split or cfg.zeroshot.split
    check_split_names(split, "--split")
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: not a directory")
    check_stage_outputs(cfg, {})
    sha = model_sha256(model_dir)  # hashed before loading: the scores belong to these bytes
    run, answerer = load_answerer(cfg, model_dir, precision, batch_size)
    scored = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, split=split))
    with run.autocast():
        metrics = evaluate(scored, answerer, data_dir).metrics
    params = {
        "model": str(model_dir),
        "model_sha256": sha,
        "checkpoint": run.encoder.format,
        "data": str(data_dir),
        "split": split,
        "precision": run.precision,
        "batch_size": run.batch_size,
        "mode": "vqa",
        "vqa_protocol": cfg.evaluate.vqa_protocol,
        "answer_max_length": cfg.zeroshot.answer_max_length,
    }
    inputs = read_inputs(model_dir, sha, data_dir, None)
    tags = {"vlp.model_sha256": sha}
    with stage_run(cfg, "zeroshot", params=params, tags=tags, inputs=inputs) as mlrun:
        mlrun.log_metrics(metrics)
    return metrics
