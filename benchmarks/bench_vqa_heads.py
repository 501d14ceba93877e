"""VQA answer heads compared on one pretrained model, same data and epochs.

- `fusion`: the ALBEF/UNITER-style head, an MLP on the fusion encoder's [ENC] state
  (question cross-attending to the image) joined with the global image token; the whole
  model finetunes at `lr_fusion`, the head at 15x that.
- `decoder`: what `vlp finetune vqa` trains (`vlp.tasks.vqa`): an answer decoder over the
  frozen pretrained image tower and text encoder, at the `finetune.vqa` settings of
  params.yaml.

Prints, per arm, the official VQA accuracy on the test split (overall and per question
type), the accuracy on the first 1,024 training questions, and the training time:

    python benchmarks/bench_vqa_heads.py models/pretrained [--epochs 16] [--arms fusion decoder]

Measured on the reference 2-core CPU: docs/2026-12-01-vqa.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from vlp.config import load_config
from vlp.data.images import image_transforms
from vlp.data.torch_data import VQADataset
from vlp.metrics.vqa import vqa_accuracy
from vlp.models import VLPModel
from vlp.tasks.vqa.model import VQAModel
from vlp.tasks.vqa.task import setup
from vlp.train.loop import TrainSettings, train


class FusionHeadVQA(VQAModel):
    """The answer head on the fused [ENC] state + global image token; everything trains."""

    def __init__(self, vlp: VLPModel, answers: list[str], head_lr_multiplier: float) -> None:
        super().__init__(vlp, answers, head_lr_multiplier, freeze_image_norm=True)
        hidden = vlp.text_encoder.config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(2 * hidden, 4 * hidden),
            nn.GELU(),
            nn.LayerNorm(4 * hidden),
            nn.Linear(4 * hidden, len(answers)),
        )

    def logits(self, pixel_values, input_ids, attention_mask):
        image_embeds, _ = self.vlp.encode_image(pixel_values)
        fused = self.vlp.fuse(image_embeds, input_ids, attention_mask)
        return self.head(torch.cat([fused[:, 0], image_embeds[:, 0]], dim=-1))


@torch.no_grad()
def accuracy(model: VQAModel, dataset, collate, limit: int | None = None) -> dict[str, float]:
    model.eval()
    rows = dataset.frame if limit is None else dataset.frame.head(limit)
    data = dataset if limit is None else Subset(dataset, range(len(rows)))
    predictions: dict[int, str] = {}
    for items in DataLoader(data, batch_size=256, collate_fn=lambda x: x):
        batch = collate(items)
        answers = model.predict(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        predictions.update(zip((it["question_id"] for it in items), answers, strict=True))
    scores = vqa_accuracy(
        predictions,
        {int(q): list(a) for q, a in zip(rows["question_id"], rows["answers"], strict=True)},
        question_types={
            int(q): str(t) for q, t in zip(rows["question_id"], rows["question_type"], strict=True)
        },
    )
    return {"overall": scores["overall"], **scores["perQuestionType"]}


def run_arm(arm: str, args: argparse.Namespace, cfg) -> dict:
    tcfg = cfg.finetune.vqa
    vlp = VLPModel.from_pretrained(args.model)
    # the training set, answer vocabulary and collate of `vlp finetune vqa`
    vqa = setup(cfg, vlp, "pretrained")
    model, train_set, collate = vqa.module, vqa.dataset, vqa.collate
    lr = tcfg.lr
    if arm == "fusion":
        vlp.requires_grad_(True)  # setup froze the encoders for the answer decoder
        torch.manual_seed(cfg.seed + 1)
        model = FusionHeadVQA(vlp, model.answers, head_lr_multiplier=15.0)
        lr = args.lr_fusion
    test_set = VQADataset(cfg.data.root, "test", image_transforms(cfg)[0])
    settings = TrainSettings.from_config(
        tcfg,
        seed=cfg.seed,
        epochs=args.epochs,
        lr=lr,
        max_steps=-1,
        precision=cfg.runtime.precision,
        checkpoint_every=0,
        log_every=10**9,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(model, train_set, collate, settings, Path(tmp))
        train_s = time.perf_counter() - t0
    return {
        "steps": result.steps,
        "train_s": round(train_s, 1),
        "test": {k: round(v, 2) for k, v in accuracy(model, test_set, collate).items()},
        "train_first_1024": round(accuracy(model, train_set, collate, 1024)["overall"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a pretrained model directory")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr-fusion", type=float, default=2e-4)
    parser.add_argument("--arms", nargs="+", default=["fusion", "decoder"])
    args = parser.parse_args()
    cfg = load_config(args.params)
    print(json.dumps({arm: run_arm(arm, args, cfg) for arm in args.arms}, indent=2))


if __name__ == "__main__":
    main()
