"""Model families: which class a model directory holds, and the one place that loads it.

`model.family` chooses the model a pipeline trains: `fusion` (`VLPModel`: image tower + BLIP
text encoder/decoder, ITC + ITM + LM) or `clip` (`CLIPDualEncoder`: transformers' CLIPModel,
contrastive loss only). A saved model directory records its family in vlp_config.json
(`model.family`; directories written before families existed are fusion models), and every
stage that reads a saved model goes through `load_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

FAMILIES = ("fusion", "clip")
CONFIG_NAME = "vlp_config.json"
# What a dual encoder does not do: the tasks that need a fusion encoder or a text decoder.
DUAL_ENCODER_TASKS = ("retrieval",)


def model_family(path: str | os.PathLike) -> str:
    """The family of a saved vlp model directory, or `clip` for a transformers CLIPModel dir.

    ConfigError when `path` is neither.
    """
    from vlp.models.clip import is_clip_checkpoint

    p = Path(path)
    meta_path = p / CONFIG_NAME
    if meta_path.is_file():
        try:
            family = json.loads(meta_path.read_text())["model"].get("family", "fusion")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ConfigError(f"{meta_path}: not a vlp model config ({e})") from None
        if family not in FAMILIES:
            raise ConfigError(f"{meta_path}: model.family {family!r} is not one of {FAMILIES}")
        return family
    if is_clip_checkpoint(p):
        return "clip"
    raise ConfigError(
        f"{p}: not a vlp model directory (no {CONFIG_NAME}) nor a transformers CLIPModel directory"
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The model saved in `path`, whatever its family (`VLPModel` or `CLIPDualEncoder`).

    Also loads a transformers CLIPModel directory with its tokenizer as a `CLIPDualEncoder`.
    """
    from vlp.models.tokenizer import local_dir

    p = local_dir(path, "model directory")
    family = model_family(p)
    if family == "clip":
        from vlp.models.clip import CLIPDualEncoder

        if (p / CONFIG_NAME).is_file():
            return CLIPDualEncoder.from_pretrained(p, device=device)
        return CLIPDualEncoder.from_checkpoint(p, device=device, key="model directory")
    from vlp.models.vlp_model import VLPModel

    return VLPModel.from_pretrained(p, device=device)


def fresh_model(path: str | os.PathLike, temperature: float) -> Any:
    """A model of the same family, architecture and tokenizer as the one saved in `path`,
    with freshly initialised weights (the from-scratch ablation); seed torch first.

    `temperature` initialises the contrastive temperature (pretrain.temperature).
    """
    from vlp.models.tokenizer import local_dir

    p = local_dir(path, "model directory")
    if model_family(p) == "clip":
        from vlp.models.clip import CLIPDualEncoder

        model = CLIPDualEncoder.from_pretrained(p, fresh=True)
        with torch.no_grad():  # the architecture is the saved one; the scale starts fresh
            model.logit_scale.fill_(float(torch.log(torch.tensor(1.0 / temperature))))
        return model
    from vlp.config import ModelConfig
    from vlp.models.tokenizer import load_tokenizer
    from vlp.models.vlp_model import TOKENIZER_DIR, build_model

    tokenizer = load_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
    model_cfg = ModelConfig(**json.loads((p / CONFIG_NAME).read_text())["model"])
    return build_model(model_cfg, tokenizer, temperature=temperature)


def build_from_params(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, temperature: float
) -> Any:
    """The model `cfg` (params' model section) describes, before any training.

    clip: `model.init_from`'s CLIPModel with its own tokenizer (`tokenizer` unused), else a
    from-scratch CLIP sized by `cfg` with `tokenizer`. fusion: `build_model`.
    """
    if cfg.family == "clip":
        from vlp.models.clip import CLIPDualEncoder, build_clip

        if cfg.init_from:
            return CLIPDualEncoder.from_checkpoint(cfg.init_from, base=cfg)
        if tokenizer is None:
            raise ConfigError("a from-scratch clip model needs a tokenizer")
        return build_clip(cfg, tokenizer, temperature)
    from vlp.models.vlp_model import build_model

    return build_model(cfg, tokenizer, temperature=temperature)
