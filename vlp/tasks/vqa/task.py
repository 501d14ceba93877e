"""VQA's torch side: answer-decoder finetuning, the answering predictor, VQA accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.tasks.predictor import Predictor as BasePredictor
from vlp.tasks.spec import Example, TaskEval, TrainingSetup

if TYPE_CHECKING:
    from PIL import Image

    from vlp.config import Config
    from vlp.models.vlp_model import VLPModel


def setup(cfg: Config, vlp: Any, init: str) -> TrainingSetup:
    """A VQAModel (VLPModel + answer decoder) with soft-score BCE on the questions of
    `finetune.splits`; a model that writes its answers (`finetune.vqa.head: generate`, or a
    family without a classifier) is trained to write them instead (`vlp.tasks.vqa.generative`)."""
    from vlp.data.decode import fast_decode
    from vlp.data.images import image_transforms
    from vlp.data.torch_data import VQADataset
    from vlp.models.family import get_family
    from vlp.models.objectives import VQAObjective
    from vlp.tasks.vqa.model import VQAModel, build_answer_vocab, make_vqa_collate

    tcfg = cfg.finetune.vqa
    dataset = VQADataset(
        cfg.data.root,
        cfg.finetune.splits,
        *image_transforms(cfg, cfg.finetune.init_dir),
        fast_jpeg=fast_decode(cfg.images.fast_decode, training=True),
    )
    from vlp.tasks.vqa import generative

    if generative.writes_answers(get_family(vlp.cfg.family), tcfg.head):
        return generative.setup(cfg, vlp, dataset)
    answers = build_answer_vocab(dataset.frame["answers"], tcfg.max_answers)
    torch.manual_seed(cfg.seed + 1)  # the head's init: same for both inits, reproducible
    vqa = VQAModel(
        vlp,
        answers,
        head_lr_multiplier=tcfg.head_lr_multiplier,
        freeze_image_norm=init == "pretrained",
        freeze_encoders=tcfg.freeze_encoders,
        answer_layers=tcfg.answer_layers,
        answer_heads=tcfg.answer_heads,
    )
    info = {"answers": answers, "freeze_encoders": tcfg.freeze_encoders, **vqa.architecture()}
    collate = make_vqa_collate(vlp.tokenizer, vlp.cfg.max_text_length, answers)
    return TrainingSetup(VQAObjective(vqa), dataset, collate, info)


def save(module: Any, model_dir: Path) -> None:
    """Write the VLPModel and the answer decoder into a model directory being assembled (a
    model that writes its answers: the model alone)."""
    vqa = module.model
    if not hasattr(vqa, "save_head"):
        vqa.cpu().save_pretrained(model_dir)
        return
    vqa.vlp.cpu().save_pretrained(model_dir)
    vqa.save_head(model_dir)


class Predictor(BasePredictor):
    """VQA: the answer head's best vocabulary answer per (image, question), or the answer
    the model writes (task.json `generative`)."""

    def __init__(
        self, model: VLPModel, info: dict[str, Any], model_dir: Path, batch_size: int = 64
    ) -> None:
        from vlp.tasks.vqa.model import load_vqa_model

        super().__init__(model, info, model_dir, batch_size)
        generative = bool(info.get("generative", False))
        self.vqa = None if generative else load_vqa_model(model, info, Path(model_dir)).eval()

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """One answer per (image, question) pair; the two lists must be equally long."""
        if len(images) != len(questions):
            raise ConfigError(f"{len(images)} images but {len(questions)} questions")
        out: list[str] = []
        for sl in self._chunks(len(images)):
            enc = self.model.tokenize(list(questions[sl]))
            pixels = self._pixels(images[sl])
            if self.vqa is None:
                out += self.model.generate_answers(
                    pixels,
                    enc["input_ids"],
                    enc["attention_mask"],
                    int(self.info["answer_max_length"]),
                )
            else:
                out += self.vqa.predict(pixels, enc["input_ids"], enc["attention_mask"])
        return out


def evaluate(cfg: Config, predictor: Predictor, data: Path) -> TaskEval:
    """Official VQA accuracy (overall, per answer type, per question type) of the answer head."""
    from vlp.data.decode import fast_decode
    from vlp.data.manifest import read_vqa, resolve_image
    from vlp.data.torch_data import read_images
    from vlp.errors import DataError
    from vlp.metrics.vqa import vqa_accuracy

    split = cfg.evaluate.split
    frame = read_vqa(data, split)
    if frame.empty:
        raise DataError(f"{data}: no VQA questions in split {split!r}")
    fast = fast_decode(cfg.images.fast_decode, training=False)
    pil = read_images(data, list(frame["image_path"]), predictor.transform, fast)
    answers = predictor.answer(pil, [str(q) for q in frame["question"]])
    predictions = dict(zip((int(q) for q in frame["question_id"]), answers, strict=True))
    scores = vqa_accuracy(
        predictions,
        {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)},
        answer_types={
            int(q): str(t) for q, t in zip(frame["question_id"], frame["answer_type"], strict=True)
        },
        question_types={
            int(q): str(t)
            for q, t in zip(frame["question_id"], frame["question_type"], strict=True)
        },
        protocol=cfg.evaluate.vqa_protocol,
    )
    metrics = {"overall": float(scores["overall"])}
    metrics.update({f"type_{k}": float(v) for k, v in scores["perAnswerType"].items()})
    # per question type ("what color is the" -> qtype_what_color_is_the), as the official
    # script's perQuestionType: shows which skills (colour, shape, counting) a model lacks
    metrics.update(
        {f"qtype_{'_'.join(k.split())}": float(v) for k, v in scores["perQuestionType"].items()}
    )
    results = [{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]
    rows = [{"answer_type": "overall", "accuracy": metrics["overall"]}] + [
        {"answer_type": k, "accuracy": float(v)} for k, v in sorted(scores["perAnswerType"].items())
    ]
    examples = [
        Example(
            image_path=resolve_image(data, row["image_path"]),
            ground_truth=list(row["answers"]),
            prediction=predictions[int(row["question_id"])],
            query=str(row["question"]),
        )
        for row in frame.head(cfg.evaluate.num_examples).to_dict("records")
    ]
    return TaskEval(metrics, results, rows, examples)


def serve(
    predictor: Any, images: list[Any], texts: dict[str, list[str]], params: dict, limits: Any
) -> dict[str, list]:
    """One answer per request row: its image and its question."""
    return {"answer": list(predictor.answer(images, texts["question"]))}
