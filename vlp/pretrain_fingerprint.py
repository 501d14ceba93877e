"""What identifies a pretrain run: its work folder, its fingerprint and what it reads.

A run resumes only a work folder written with the same `fingerprint` (the params it trains
with and the data hash); `read_inputs` names the data and checkpoints it read by content hash
for its MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from vlp.config import Config
from vlp.vision_init import with_mae_tower

# params that decide where and how often progress is saved or shown, not what is learned:
# a resumed run may change them.
UNFINGERPRINTED = (
    "pretrain.out_dir",
    "pretrain.checkpoint_every",
    "pretrain.eval_split",
    "pretrain.eval_batch_size",
    "runtime.log_every",
    "runtime.metrics_dir",
    "runtime.plots_dir",
    "runtime.local_loss",
    "runtime.gradient_checkpointing",
    "runtime.compile",
)


def work_dir(cfg: Config) -> Path:
    """Checkpoints and the tokenizer of an unfinished run; kept outside the stage output."""
    out = Path(cfg.pretrain.out_dir)
    return out.with_name(f"{out.name}.work")


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What the trained model depends on: the params this stage trains with and the data hash.

    With a pretrained image processor, the processor as resolved (its settings at the size
    used) too: editing the checkpoint's processor changes what is learned. With
    `pretrain_vision.enabled`, the content hash of the masked autoencoder it starts from.
    """
    from vlp.data.images import image_transforms
    from vlp.data.manifest import dataset_hash
    from vlp.data.processors import ProcessorTransform
    from vlp.tasks import model_sha256

    params = {
        "seed": cfg.seed,
        "data.image_size": cfg.data.image_size,
        "pretrain_vision.enabled": cfg.pretrain_vision.enabled,
        **{f"images.{k}": v for k, v in dataclasses.asdict(cfg.images).items()},
        **{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
        **{
            key: v
            for section in ("runtime", "pretrain")
            for k, v in dataclasses.asdict(getattr(cfg, section)).items()
            if (key := f"{section}.{k}") not in UNFINGERPRINTED
        },
    }
    if cfg.pretrain_vision.enabled:  # the MAE encoder it starts from, by content
        params["pretrain_vision.out_dir"] = model_sha256(cfg.pretrain_vision.out_dir)
    transform = image_transforms(with_mae_tower(cfg))[0]
    if isinstance(transform, ProcessorTransform):
        params["image_processor"] = transform.model_files()
    if cfg.data.shards is not None:  # the stream trained on: its shards, by their index
        from vlp.data.shards import INDEX_FILE

        params["data.shuffle_buffer"] = cfg.data.shuffle_buffer
        index = (Path(cfg.data.shards) / INDEX_FILE).read_bytes()
        params["data.shards"] = hashlib.sha256(index).hexdigest()
    return {"params": params, "data": dataset_hash(cfg.data.root)}


CHECKPOINT_KEYS = ("init_from", "image_pretrained", "text_pretrained", "tokenizer_pretrained")


def check_checkpoint_deps(cfg: Config) -> None:
    """Refuse, inside `dvc repro`, a checkpoint directory of the model section that is not
    one of the stage's deps (`vlp.lineage.check_checkpoint_deps`)."""
    from vlp.lineage import check_checkpoint_deps as check

    check({f"model.{key}": getattr(cfg.model, key) for key in CHECKPOINT_KEYS})


def read_inputs(
    cfg: Config, data_hash: str, shards_hash: str | None = None
) -> dict[str, tuple[str, str]]:
    """What a pretrain run reads, by content hash (`stage_run` inputs).

    The dataset (`data_hash`, as in the fingerprint), the shard index it streams from
    (`shards_hash`, idem), each checkpoint directory of the model section
    (`model.init_from`, `*_pretrained`) and the masked autoencoder the image tower starts
    from (`pretrain_vision.out_dir`, when `pretrain_vision.enabled`).
    """
    from vlp.tasks import model_sha256

    inputs = {"data": (cfg.data.root, data_hash)}
    if shards_hash is not None:
        inputs["shards"] = (str(cfg.data.shards), shards_hash)
    for key in CHECKPOINT_KEYS:
        path = getattr(cfg.model, key)
        if path and Path(path).is_dir():
            inputs[f"model.{key}"] = (path, model_sha256(path))
    if cfg.pretrain_vision.enabled:
        mae = cfg.pretrain_vision.out_dir
        inputs["pretrain_vision.out_dir"] = (mae, model_sha256(mae))
    return inputs
