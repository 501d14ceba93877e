"""What does a pretrained model see? Caption-decoder accuracy on attribute words, per attribute.

For each model directory (a `vlp pretrain` output), the caption decoder reads the test
captions of the shapes dataset teacher-forced, conditioned on their images, and predicts every
next token. Accuracy is reported separately for the tokens that name a shape, a colour, a size
or a position, next to chance (one over the number of words of that kind). A word the model
can only guess from the caption's own context (e.g. a shape after "a large red") scores near
chance when the image tower has not learned that attribute.

Run it on models pretrained for different numbers of epochs to see when each attribute is
learned; it explains VQA accuracy per question type (`qtype_*` in metrics/vqa.json), since
nearly every shapes question refers to objects by their shape.

    .venv/bin/python benchmarks/bench_grounding.py models/pretrained other/pretrained
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlp.data.images import ImageTransform
from vlp.data.shapes import COLORS, SHAPES, SIZES
from vlp.data.torch_data import PairsDataset
from vlp.models import VLPModel

WORD_GROUPS = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "size": list(SIZES),
    "position": ["left", "right", "top", "bottom", "center"],
}


@torch.no_grad()
def attribute_accuracy(
    model: VLPModel,
    data_dir: Path,
    image_size: int,
    batch_size: int = 256,
    first_only: bool = False,
) -> dict[str, dict[str, float]]:
    """{group: {"accuracy", "chance", "n"}} of teacher-forced next-token predictions.

    `first_only` reads only each test image's first caption (in manifest order).
    """
    model.eval()
    square = ImageTransform(image_size, "squash", (0.5,) * 3, (0.5,) * 3)  # the shapes' transform
    pairs = PairsDataset(data_dir, "test", square, first_caption_only=first_only)
    rows = range(len(pairs))
    group_ids = {}
    for group, words in WORD_GROUPS.items():
        ids = model.tokenizer.convert_tokens_to_ids(words)
        if model.tokenizer.unk_token_id in ids:
            raise SystemExit(f"{group} words {words} are not single tokens of this tokenizer")
        group_ids[group] = torch.tensor(ids)
    hits = {g: 0 for g in WORD_GROUPS}
    totals = {g: 0 for g in WORD_GROUPS}
    for start in range(0, len(rows), batch_size):
        items = [pairs[i] for i in rows[start : start + batch_size]]
        image_embeds, _ = model.encode_image(torch.stack([it["pixel_values"] for it in items]))
        enc = model.tokenize([it["caption"] for it in items])
        ids = enc["input_ids"].clone()
        ids[:, 0] = model.dec_token_id
        logits = model.text_decoder(
            input_ids=ids, attention_mask=enc["attention_mask"], encoder_hidden_states=image_embeds
        ).logits
        predicted, target = logits[:, :-1].argmax(dim=-1), ids[:, 1:]
        for group, gids in group_ids.items():
            is_group = torch.isin(target, gids)
            hits[group] += int(((predicted == target) & is_group).sum())
            totals[group] += int(is_group.sum())
    return {
        g: {
            "accuracy": hits[g] / max(totals[g], 1),
            "chance": 1 / len(WORD_GROUPS[g]),
            "n": totals[g],
        }
        for g in WORD_GROUPS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="pretrained model directories")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    report = {}
    for path in args.models:
        model = VLPModel.from_pretrained(path)
        report[str(path)] = attribute_accuracy(model, args.data, args.image_size)
        row = "  ".join(
            f"{g} {r['accuracy']:.3f} (chance {r['chance']:.2f})"
            for g, r in report[str(path)].items()
        )
        print(f"{path}: {row}", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
