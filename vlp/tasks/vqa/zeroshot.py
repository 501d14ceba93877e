"""`vlp zeroshot --task vqa` (`--vqa`): a checkpoint answers a split's VQA questions untrained, scored by
vlp's VQA accuracy (`evaluate.vqa_protocol`; the keys `vlp evaluate` writes for VQA).

The checkpoint is either

- a VQA task model (task.json `task: vqa`): it answers as `vlp evaluate` has it answer, with
  its classifier or by writing (`vlp.tasks.vqa.task.Predictor`); or
- a foreign checkpoint of a family that writes answers (`Family.generates_answers`) whose
  answer writer is trained: BLIP's `BlipForQuestionAnswering`, whose answer decoder reads the
  question fused with the image ([ENC] first) and writes greedily at most
  `zeroshot.answer_max_length` tokens, as `BlipForQuestionAnswering.generate` does
  (`VLPModel.generate_answers`); with `--answers FILE` (a JSON list, BLIP's
  `answer_list.json`) it ranks those candidates instead, as BLIP answers for the VQA v2
  leaderboard (`vlp.tasks.vqa.answer_ranking`, top `zeroshot.answer_rank_k` by first token).
  A checkpoint whose writer would start untrained is refused with
  `vlp.models.family.untrained_for`'s reason.

It runs in batches of `zeroshot.batch_size`, under bf16 autocast when the precision resolves
to bf16, and records an MLflow run as `vlp zeroshot` does (mode `vqa`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError
from vlp.inference import Inference, inference_settings, read_inputs, record_zeroshot
from vlp.tasks.vqa.answer_ranking import rank_answers, read_candidates

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config


class CheckpointAnswerer:
    """A checkpoint that writes answers (or ranks `candidates`, the best of its top `rank_k`),
    with the VQA predictor's `transform` and `answer`."""

    def __init__(
        self, run: Inference, max_length: int, candidates: list[str] | None, rank_k: int
    ) -> None:
        self.run = run
        self.max_length = max_length
        self.candidates = candidates
        self.rank_k = rank_k
        self.transform = run.encoder.transform

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """One written answer per (image, question) pair."""
        model, device, size = self.run.encoder.model, self.run.encoder.device, self.run.batch_size
        out: list[str] = []
        for start in range(0, len(images), size):
            enc = model.tokenize(list(questions[start : start + size]))
            pixels = self.transform.pixels(images[start : start + size]).to(device)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            with self.run.autocast():
                if self.candidates is None:
                    out += model.generate_answers(pixels, ids, mask, self.max_length)
                else:
                    out += rank_answers(model, pixels, ids, mask, self.candidates, self.rank_k)
        return out


def load_answerer(
    cfg: Config,
    model_dir: Path,
    precision: str | None,
    batch_size: int | None,
    candidates: list[str] | None = None,
) -> tuple[Inference, Any]:
    """(how it runs, what answers: a VQA task model's predictor or a `CheckpointAnswerer`,
    which ranks `candidates` when given)."""
    from vlp.models.family import load_model, recognise, untrained_for
    from vlp.models.tokenizer import local_dir
    from vlp.tasks import TASKS

    batch_size, device, amp_dtype = inference_settings(cfg, precision, batch_size)
    p = local_dir(model_dir, "--model")
    family, meta = recognise(p, "--model")
    if meta is None:
        if not family.generates_answers or "vqa" not in family.zeroshot_tasks:
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
    if meta is None or info is None or info.get("task") != "vqa":
        writes = callable(getattr(loaded.model, "generate_answers", None))
        if not writes or "vqa" not in family.zeroshot_tasks:
            raise ConfigError(
                f"--model: {p} is a vlp model directory but not a VQA task model (task.json "
                "task: vqa) and its model writes no answers: finetune it for VQA first"
            )
        if candidates is not None and not hasattr(loaded.model, "question_states"):
            raise ConfigError(
                f"--answers: ranking candidates needs BLIP's answer decoder; {p} is a "
                f"{family.name} model"
            )
        # a checkpoint, or a pretrained (or other task's) model of a family that writes answers
        z = cfg.zeroshot
        return run, CheckpointAnswerer(run, z.answer_max_length, candidates, z.answer_rank_k)
    if candidates is not None:
        raise ConfigError(f"--answers: {p} is a VQA task model; it answers as it was finetuned")
    predictor = TASKS["vqa"].module().Predictor(loaded.model, info, p, batch_size)
    return run, predictor


def zeroshot(
    cfg: Config,
    model_dir: Path,
    data_dir: Path,
    *,
    split: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    answers: str | None = None,
) -> dict[str, float]:
    """Answer `data_dir`'s VQA questions of `split` with `model_dir` (ranking the candidates
    of the JSON file `answers` when given); record an MLflow run; return the scores."""
    from vlp.inference import run_params, start_zeroshot
    from vlp.tasks.vqa.task import evaluate

    split, sha = start_zeroshot(cfg, model_dir, data_dir, split)
    candidates = read_candidates(answers) if answers else None
    run, answerer = load_answerer(cfg, model_dir, precision, batch_size, candidates)
    scored = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, split=split))
    with run.autocast():
        metrics = evaluate(scored, answerer, data_dir).metrics
    params = {
        **run_params(run, model_dir, sha, data_dir, split, "vqa"),
        "vqa_protocol": cfg.evaluate.vqa_protocol,
        "answer_max_length": cfg.zeroshot.answer_max_length,
        "answers": answers or "written",
    }
    if candidates is not None:
        params["answer_rank_k"] = cfg.zeroshot.answer_rank_k
    inputs = read_inputs(model_dir, sha, data_dir, None)
    if answers:
        with open(answers, "rb") as f:
            inputs["answers"] = (answers, hashlib.file_digest(f, "sha256").hexdigest())
    record_zeroshot(cfg, params, metrics, inputs, sha)
    return metrics
