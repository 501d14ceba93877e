"""What the pretrain stage reports of its model: the zero-shot retrieval check and the metrics.

`save_and_check` saves the pretrained model and runs the check on it; `write_results` writes
`<runtime.metrics_dir>/pretrain.json` and `<runtime.plots_dir>/pretrain_loss.csv` and logs them
to the stage's MLflow run. A trained run (`vlp.pretrain.pretrain`) and an untrained one
(`vlp.pretrain.save_init_from`) write their output through these same two steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.config import Config
from vlp.io import atomic_write_csv, atomic_write_json
from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE
from vlp.train.distributed import DistInfo
from vlp.train.settings import TrainResult

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")
PLOT_COLUMNS = ("step", *LOSS_KEYS, "lr")


def smoothed_ends(history: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last 10% of steps (at least one step each)."""
    values = [h[key] for h in history if key in h]
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


@torch.no_grad()
def zero_shot_retrieval(model: Any, cfg: Config, split: str) -> dict[str, float]:
    """ITC-only retrieval on `split` (R@1/5/10 both ways, VSE++ protocol) and chance levels."""
    from torch.utils.data import DataLoader

    from vlp.data.images import image_transforms
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import ImagesDataset, collate
    from vlp.metrics.retrieval import retrieval_recall
    from vlp.models.embed import embed_texts, encode_images

    model.eval()
    images = ImagesDataset(cfg.data.root, split, image_transforms(cfg)[0])
    loader = DataLoader(images, batch_size=cfg.pretrain.eval_batch_size, collate_fn=collate)
    image_feat = encode_images(model, (batch["pixel_values"] for batch in loader))[1]
    pairs = read_pairs(cfg.data.root, split)
    index = {image_id: i for i, image_id in enumerate(images.image_ids)}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    captions = list(pairs["caption"])
    text_feat = embed_texts(model, captions, cfg.pretrain.eval_batch_size)
    scores = retrieval_recall(text_to_image, image_feat @ text_feat.t())
    n_img, n_txt = len(images), len(captions)
    per_image = n_txt / n_img
    for k in (1, 5, 10):
        # a random ranking finds the image in the top k with chance k/n; an image finds
        # one of its ~per_image captions in the top k with chance ~k*per_image/n_txt
        scores[f"chance_t2i_R@{k}"] = 100.0 * min(k, n_img) / n_img
        scores[f"chance_i2t_R@{k}"] = 100.0 * min(1.0, k * per_image / n_txt)
    scores.update(n_images=float(n_img), n_texts=float(n_txt))
    return scores


def zero_shot_skipped(cfg: Config, untrained: bool = False) -> str | None:
    """Why the zero-shot check after training cannot run (a family without contrastive
    embeddings, no eval split, or no data), or None.

    `untrained`: the model is `model.init_from` as is; a checkpoint whose retrieval heads would
    start random is skipped with the reason `vlp zeroshot` refuses it with
    (`vlp.models.family.untrained_for`).
    """
    from vlp.data.manifest import split_sizes
    from vlp.models.family import get_family, untrained_for

    family = get_family(cfg.model.family)
    if "itc" not in family.objectives:
        return f"skipped: the {family.name} family has no contrastive embeddings to retrieve with"
    if untrained and cfg.model.init_from:
        reason = untrained_for(cfg.model.init_from, "retrieval", "model.init_from")
        if reason is not None:
            return f"skipped: {reason}"
    split = cfg.pretrain.eval_split
    if split is None:
        return "skipped: pretrain.eval_split is null"
    if not split_sizes(cfg.data.root).get(split):
        return f"skipped: no {split!r} split in {cfg.data.root}"
    return None


def zero_shot_metrics(zero_shot: dict[str, float] | str) -> dict[str, Any]:
    """The zero-shot check as metrics: its scores, or why it was skipped."""
    if isinstance(zero_shot, str):
        return {"zero_shot": zero_shot}
    return {f"zeroshot_{k}": v for k, v in zero_shot.items()}


def summary(
    result: TrainResult,
    zero_shot: dict[str, float] | str,
    wall_s: float,
    warmup: TrainResult | None = None,
) -> dict[str, Any]:
    """The stage's metrics: smoothed first/last losses of each phase, the zero-shot check, speed."""
    metrics: dict[str, Any] = {}
    if warmup is not None:
        first, last = smoothed_ends(warmup.history, "loss_lm")
        metrics.update(
            caption_warmup_steps=warmup.steps,
            caption_warmup_s=warmup.wall_s,
            caption_warmup_loss_lm_first=first,
            caption_warmup_loss_lm_last=last,
        )
    for key in LOSS_KEYS:
        if any(key in h for h in result.history):
            first, last = smoothed_ends(result.history, key)
            metrics[f"{key}_first"], metrics[f"{key}_last"] = first, last
    metrics.update(zero_shot_metrics(zero_shot))
    metrics.update(
        steps=result.steps,
        train_samples_per_s=result.samples_per_s,
        train_s=result.wall_s,
        wall_s=wall_s,
        world_size=result.world_size,
    )
    return metrics


def save_and_check(
    model: Any,
    cfg: Config,
    transform: Any,
    info: DistInfo | None = None,
    untrained: bool = False,
) -> dict[str, float] | str:
    """Save the pretrained model to `pretrain.out_dir`, then run the zero-shot check on it.

    Saved first: the check is optional and never costs the model. Returns the check's scores,
    or why it was skipped. With `info`, the model moves to the run's device for the check first.
    `untrained`: the model is `model.init_from` as is (`zero_shot_skipped`).
    """
    model.save_pretrained(
        Path(cfg.pretrain.out_dir),
        {IMAGE_TRANSFORM_FILE: transform.to_dict(), **transform.model_files()},
    )
    skipped = zero_shot_skipped(cfg, untrained)
    if skipped is not None:
        print(f"pretrain: zero-shot retrieval {skipped}")
        return skipped
    if info is not None:
        from vlp.train.settings import resolve_device

        model.to(resolve_device(cfg.runtime.device, info))
    return zero_shot_retrieval(model, cfg, cfg.pretrain.eval_split)


def write_results(
    cfg: Config, run: Any, metrics: dict[str, Any], history: list[dict[str, float]]
) -> None:
    """Write the metrics and the loss curve, and log both (and the numeric metrics) to `run`."""
    metrics_path = Path(cfg.runtime.metrics_dir) / "pretrain.json"
    plot_path = Path(cfg.runtime.plots_dir) / "pretrain_loss.csv"
    atomic_write_json(metrics_path, metrics)
    atomic_write_csv(plot_path, PLOT_COLUMNS, history)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    if "zero_shot" in metrics:
        run.set_tags({"vlp.zero_shot": metrics["zero_shot"]})
    run.log_artifact(metrics_path)
    run.log_artifact(plot_path)
    print(json.dumps(metrics, indent=2))
