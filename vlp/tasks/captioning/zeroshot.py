"""Zero-shot captioning of a checkpoint that writes text (`vlp zeroshot --task captioning`):
the model generates, vlp's metrics score, nothing is trained; the run is recorded as
`vlp zeroshot` records its runs (`vlp.inference.record_zeroshot`).

The checkpoint is any model directory whose family lists captioning in
`Family.zeroshot_tasks` and whose model writes text: a vlp model directory of a generative
family (pretrained or finetuned) or a local transformers `VisionEncoderDecoderModel` (a
ViT-GPT2 captioner). One caption per image of the split (`generate_captions`), scored
against all of the image's captions with the COCO toolkit's BLEU-1..4, ROUGE-L and CIDEr-D
(`vlp.metrics.caption.score_captions`), the keys `vlp evaluate` writes for the task.

Decoding follows a finetuned task model's task.json (`beam_size`, `max_length`), else
params: `finetune.captioning.beam_size` and `max_length`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vlp.config import Config


def decoding(cfg: Config, info: dict[str, Any] | None) -> dict[str, int]:
    """Captioning's decoding settings: a task model's own (`info`, its task.json), else params'."""
    info = info or {}
    caption = cfg.finetune.captioning
    settings = {
        "beam_size": int(info.get("beam_size", caption.beam_size)),
        "max_length": int(info.get("max_length", caption.max_length)),
    }
    for key, value in settings.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1 to decode, got {value}")
    return settings


def captioning_metrics(
    run: Any, data_dir: Path, split: str, beam_size: int, max_length: int
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of one generated caption per image of `split`.

    `run`: a `vlp.inference.Inference` (the loaded model, batch size and autocast).
    """
    from vlp.data.manifest import PAIRS_FILE, no_rows_in_splits, read_pairs
    from vlp.inference import image_batches
    from vlp.metrics.caption import score_captions

    if not (data_dir / PAIRS_FILE).is_file():
        raise DataError(f"--data {data_dir}: no {PAIRS_FILE}; not a vlp dataset")
    pairs = read_pairs(data_dir, split)
    if pairs.empty:
        raise no_rows_in_splits(data_dir, split, "caption pairs", key="--split")
    images = pairs.drop_duplicates("image_id")
    model, device = run.encoder.model, run.encoder.device
    captions: list[str] = []
    batches = image_batches(
        data_dir, list(images["image_path"]), run.batch_size, run.encoder.transform
    )
    for pixels in batches:
        with run.autocast():
            captions += model.generate_captions(
                pixels.to(device), num_beams=beam_size, max_length=max_length
            )
    results = dict(zip((int(i) for i in images["image_id"]), captions, strict=True))
    refs = {int(i): list(g) for i, g in pairs.groupby("image_id", sort=True)["caption"]}
    metrics = {k: float(v) for k, v in score_captions(results, refs).items()}
    return {**metrics, "n_images": float(len(images))}


def measure(
    cfg: Config, run: Any, data_dir: Path, split: str, task: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """(decoding params, scores) of the loaded model `run` captioning `split`, untrained."""
    if task != "captioning":
        raise ConfigError(f"--task {task}: zero-shot {task} is not measured here (captioning is)")
    if not callable(getattr(run.encoder.model, "generate_captions", None)):
        raise ConfigError(
            f"--model: {run.encoder.path} holds a model that does not write captions "
            "(it has no generate_captions)"
        )
    settings = decoding(cfg, run.encoder.task_info)
    return settings, captioning_metrics(run, data_dir, split, **settings)


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
    """Caption `data_dir`'s images of `split` with `model_dir`; record an MLflow run; return
    the scores. (`answers` belongs to VQA: refused.)"""
    from vlp.inference import (
        load_inference,
        read_inputs,
        record_zeroshot,
        run_params,
        start_zeroshot,
    )

    if answers:
        raise ConfigError("--answers ranks VQA answers: it needs --task vqa (--vqa)")
    split, sha = start_zeroshot(cfg, model_dir, data_dir, split)
    run = load_inference(cfg, model_dir, precision, batch_size, "captioning")
    settings, metrics = measure(cfg, run, data_dir, split, "captioning")
    params = {**run_params(run, model_dir, sha, data_dir, split, "captioning"), **settings}
    record_zeroshot(cfg, params, metrics, read_inputs(model_dir, sha, data_dir, None), sha)
    return metrics
