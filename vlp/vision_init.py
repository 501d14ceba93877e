"""Where VLP pretraining's image tower starts when masked-autoencoder pretraining ran.

With `pretrain_vision.enabled`, the `pretrain-vision` stage writes a ViTMAE checkpoint to
`pretrain_vision.out_dir` and `pretrain` builds its ViT image tower from that directory's
encoder, exactly as if `model.image_pretrained` named it (`with_mae_tower`): its weights,
and its image processor, which is saved with the pretrained model. Disabled, the stage
writes only a marker file (`DISABLED_MARKER`: `disabled.json`, `{"enabled": false}`) and
trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from vlp.config import Config
from vlp.errors import ConfigError

# all the disabled stage writes (`vlp.pretrain_vision.DISABLED_FILE`)
DISABLED_MARKER = "disabled.json"
MAE_MODEL_TYPE = "vit_mae"  # transformers' model_type of a ViTMAE checkpoint


def holds_trained_mae(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a ViTMAE checkpoint (not the disabled stage's marker)."""
    p = Path(directory)
    marker = p / DISABLED_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("enabled") is False:
                return False
        except (OSError, ValueError, AttributeError):
            pass  # not the marker: judged by its config below
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MAE_MODEL_TYPE


def trained_mae_dir(cfg: Config) -> Path | None:
    """`pretrain_vision.out_dir` if it holds a trained masked autoencoder, else None."""
    out = Path(cfg.pretrain_vision.out_dir)
    return out if holds_trained_mae(out) else None


def with_mae_tower(cfg: Config) -> Config:
    """`cfg` whose image tower starts from `pretrain_vision.out_dir` when MAE pretraining ran.

    Unchanged when `pretrain_vision.enabled` is false. Otherwise `model.image_pretrained`
    names the MAE directory; ConfigError if the tower is not a ViT, if the model already
    starts from another checkpoint (`model.image_pretrained`, `model.init_from`), if its
    family builds no tower from a checkpoint, or if the directory holds no trained MAE.
    """
    from vlp.models.family import get_family

    if not cfg.pretrain_vision.enabled:
        return cfg
    out = cfg.pretrain_vision.out_dir
    why = f"pretrain_vision.enabled: the image tower starts from the masked autoencoder in {out}"
    m = cfg.model
    if m.image_tower != "vit":
        raise ConfigError(f"model.image_tower: {m.image_tower!r}, but {why}, a ViT: set it to vit")
    for key in ("image_pretrained", "init_from"):
        if getattr(m, key):
            raise ConfigError(
                f"model.{key}: {getattr(m, key)!r}, but {why}; set one of them only "
                f"(pretrain_vision.enabled: false, or model.{key}: null)"
            )
    if not get_family(m.family).loads_image_tower:
        raise ConfigError(
            f"model.family: {m.family!r} builds no image tower from a checkpoint; {why}"
        )
    if not holds_trained_mae(out):
        raise ConfigError(
            f"pretrain_vision.out_dir: {out} holds no trained masked autoencoder (a ViTMAE "
            "checkpoint); run `vlp pretrain-vision` with pretrain_vision.enabled: true first"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, image_pretrained=str(out)))
