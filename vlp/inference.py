"""How `vlp zeroshot` and `vlp embed` run a checkpoint untrained: device, precision, batch size.

`load_inference` loads a model directory (`vlp.models.family.load_model`) for a zero-shot
task of its family (`Family.zeroshot_tasks`) or for embedding, under
`zeroshot.precision` (`--precision`): `auto` is fp32 on CPUs, as a checkpoint's own
outputs, and bf16 on GPUs that have it (`resolve_inference_precision`). `record_zeroshot`
records the MLflow run (stage `zeroshot`) every zero-shot measurement makes, with the
content hashes of what it read (`read_inputs`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vlp.config import Config
    from vlp.models.family import LoadedModel

SHAPES_LABELS = "shapes"  # `--labels shapes`: the shapes world's labelling, not a file


@dataclass
class Inference:
    """How a checkpoint runs: the encoder, batch size and autocast dtype (None: fp32)."""

    encoder: LoadedModel
    batch_size: int
    amp_dtype: torch.dtype | None

    @property
    def precision(self) -> str:
        from vlp.train.settings import precision_name

        return precision_name(self.amp_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.encoder.device.type, dtype=self.amp_dtype)


def load_inference(
    cfg: Config,
    model_dir: str | os.PathLike,
    precision: str | None,
    batch_size: int | None,
    task: str | None = None,
) -> Inference:
    """Load `model_dir` on `runtime.device` with `precision` (default `zeroshot.precision`) for
    the `vlp zeroshot` task `task` (None: `vlp embed`'s embeddings)."""
    from vlp.models.family import get_family, load_model, model_family, zeroshot_not_applicable

    batch_size, device, amp_dtype = inference_settings(cfg, precision, batch_size)
    why = zeroshot_not_applicable(get_family(model_family(model_dir, "--model")), task)
    if why:
        raise ConfigError(f"--model: {model_dir} holds {why}")
    # a foreign checkpoint reads texts up to its own text positions (no `base` cap)
    encoder = load_model(
        model_dir, device, key="--model", temperature=cfg.model.temperature, as_is=True
    )
    encoder.model.eval()
    encoder.transform  # noqa: B018 (a directory without a known transform is refused here)
    return Inference(encoder, batch_size, amp_dtype)


def inference_settings(
    cfg: Config, precision: str | None, batch_size: int | None
) -> tuple[int, torch.device, torch.dtype | None]:
    """(batch size, device, autocast dtype or None) as `--batch-size` and `--precision` say."""
    from vlp.config import PRECISIONS
    from vlp.train.distributed import DistInfo
    from vlp.train.settings import resolve_device, resolve_inference_precision

    precision = precision or cfg.zeroshot.precision
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    batch_size = batch_size or cfg.zeroshot.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    device = resolve_device(cfg.runtime.device, DistInfo())
    return batch_size, device, resolve_inference_precision(precision, device)


def read_inputs(
    model_dir: Path, model_hash: str, data_dir: Path, labels: str | None
) -> dict[str, tuple[str, str]]:
    """What `vlp zeroshot` reads, by content hash (`stage_run` inputs): the model, the
    dataset or image folder, and a label file (not `--labels shapes`, which is no file)."""
    import hashlib

    from vlp.data.manifest import dataset_hash

    inputs = {
        "model": (str(model_dir), model_hash),
        "data": (str(data_dir), dataset_hash(data_dir)),
    }
    if labels is not None and labels != SHAPES_LABELS:
        with open(labels, "rb") as f:
            inputs["labels"] = (labels, hashlib.file_digest(f, "sha256").hexdigest())
    return inputs


def record_zeroshot(
    cfg: Config,
    params: dict[str, Any],
    metrics: dict[str, float],
    inputs: dict[str, tuple[str, str]],
    model_hash: str,
) -> None:
    """The MLflow run (stage `zeroshot`) of one zero-shot measurement."""
    from vlp.tracking import stage_run

    tags = {"vlp.model_sha256": model_hash}
    with stage_run(cfg, "zeroshot", params=params, tags=tags, inputs=inputs) as mlrun:
        mlrun.log_metrics(metrics)


def start_zeroshot(
    cfg: Config, model_dir: Path, data_dir: Path, split: str | None
) -> tuple[str, str]:
    """(split, model hash) of a zero-shot measurement, its inputs checked: `split` (default
    `zeroshot.split`), the data folder, the tracking store; the model hashed before it is
    loaded, so the scores belong to exactly these bytes."""
    from vlp.data.manifest import check_split_names
    from vlp.tasks import model_sha256
    from vlp.tracking import check_stage_outputs

    split = split or cfg.zeroshot.split
    check_split_names(split, "--split")
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: not a directory")
    check_stage_outputs(cfg, {})
    return split, model_sha256(model_dir)


def run_params(
    run: Inference, model_dir: Path, model_hash: str, data_dir: Path, split: str, mode: str
) -> dict[str, Any]:
    """The MLflow params every zero-shot run records: what ran, on what, how."""
    return {
        "model": str(model_dir),
        "model_sha256": model_hash,
        "checkpoint": run.encoder.format,
        "data": str(data_dir),
        "split": split,
        "precision": run.precision,
        "batch_size": run.batch_size,
        "mode": mode,
    }


def image_batches(
    data_dir: Path, image_paths: Sequence[str], batch_size: int, transform: Any
) -> Iterator[torch.Tensor]:
    """Pixel batches of the images at `image_paths` (relative to `data_dir`), decoded per batch."""
    from vlp.data.manifest import image_roots, locate_image
    from vlp.data.torch_data import open_image

    roots = image_roots(data_dir)
    for start in range(0, len(image_paths), batch_size):
        batch = image_paths[start : start + batch_size]
        yield transform.pixels([open_image(locate_image(data_dir, p, roots)) for p in batch])
