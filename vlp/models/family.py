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
from vlp.models.weights import CONFIG_NAME, read_saved, saved_model_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

FAMILIES = ("fusion", "clip")
# The tasks a dual encoder does: no fusion encoder (ITM, VQA) and no text decoder (captions)
DUAL_ENCODER_TASKS = ("retrieval",)


def model_family(path: str | os.PathLike) -> str:
    """The family of a saved vlp model directory, or `clip` for a transformers CLIPModel dir.

    ConfigError when `path` is neither.
    """
    from vlp.models.clip import is_clip_checkpoint

    p = Path(path)
    meta_path = p / CONFIG_NAME
    if meta_path.is_file():
        family = read_saved(p)["model"].get("family", "fusion")
        if family not in FAMILIES:
            raise ConfigError(f"{meta_path}: model.family {family!r} is not one of {FAMILIES}")
        return family
    if is_clip_checkpoint(p):
        return "clip"
    raise ConfigError(
        f"{p}: not a vlp model directory (no {CONFIG_NAME}) nor a transformers CLIPModel directory"
    )


def checkpoint_model_config(
    config: Any,
    source: str | os.PathLike,
    base: ModelConfig | None,
    *,
    family: str,
    image_tower: str,
    embed_dim: int,
) -> ModelConfig:
    """The `ModelConfig` of a transformers checkpoint with text and vision towers (CLIP, BLIP).

    Sizes vlp's params share between the towers are the text tower's; `max_text_length` is
    the text positions, capped by `base.max_text_length` when `base` is given.
    """
    from vlp.config import ModelConfig

    text, vision = config.text_config, config.vision_config
    length = text.max_position_embeddings
    if base is not None:
        length = min(length, base.max_text_length)
    patch = vision.patch_size
    return ModelConfig(
        family=family,
        init_from=str(source),
        image_tower=image_tower,
        image_pretrained=None,
        text_pretrained=None,
        tokenizer_pretrained=None,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_text_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        embed_dim=embed_dim,
        max_text_length=length,
        patch_size=patch if isinstance(patch, int) else int(patch[0]),
        num_image_layers=vision.num_hidden_layers,
        cnn_channels=[],
    )


def task_not_applicable(family: str, task: str) -> str | None:
    """Why a model of `family` cannot be finetuned for `task`, or None when it can."""
    if family == "clip" and task not in DUAL_ENCODER_TASKS:
        return (
            f"a dual encoder (model.family: clip) does not do {task}: it has no text decoder "
            "and no fusion encoder, only image and text embeddings (retrieval)"
        )
    return None


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
    from vlp.models.tokenizer import load_tokenizer
    from vlp.models.vlp_model import TOKENIZER_DIR, VLPModel, build_model

    cfg = saved_model_config(read_saved(p))
    if cfg.init_from:
        # The architecture came from a checkpoint (e.g. BLIP's), not from the model params:
        # rebuilt from the configs saved with it.
        model = VLPModel.from_pretrained(p, weights=False)
        with torch.no_grad():
            model.temp.fill_(temperature)
        return model
    tokenizer = load_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
    return build_model(cfg, tokenizer, temperature=temperature)


def checkpoint_kind(path: str | os.PathLike, key: str = "model.init_from") -> str:
    """What a local checkpoint directory holds: "vlp" (a saved vlp model of either family),
    "blip" (a transformers BLIP checkpoint) or "clip" (a transformers CLIPModel).

    Anything else is a ConfigError naming `key`.
    """
    from vlp.models.blip import blip_architecture
    from vlp.models.clip import is_clip_checkpoint
    from vlp.models.tokenizer import local_dir

    p = local_dir(path, key)
    if (p / CONFIG_NAME).is_file():
        return "vlp"
    if blip_architecture(p) is not None:
        return "blip"
    if is_clip_checkpoint(p):
        return "clip"
    model_type = None
    if (p / "config.json").is_file():
        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{key}: cannot read {p / 'config.json'}: {e}") from None
    raise ConfigError(
        f"{key}: {p} holds neither a vlp model ({CONFIG_NAME}) nor a transformers BLIP or "
        f"CLIPModel checkpoint; its model type: {model_type!r}"
    )


def check_init_from(cfg: ModelConfig) -> str:
    """The kind of `model.init_from` (`checkpoint_kind`), checked against `model.family`."""
    assert cfg.init_from, "model.init_from is not set"
    kind = checkpoint_kind(cfg.init_from)
    family = model_family(cfg.init_from) if kind == "vlp" else kind
    family = "fusion" if family == "blip" else family
    if family != cfg.family:
        hint = (
            "; to use its vision tower in the fusion model, set model.image_pretrained instead"
            if family == "clip"
            else ""
        )
        raise ConfigError(
            f"model.init_from: {cfg.init_from} holds a {family} model but model.family is "
            f"{cfg.family!r}: set model.family: {family}{hint}"
        )
    return kind


def build_from_params(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, temperature: float
) -> Any:
    """The model `cfg` (params' model section) describes, before any training.

    With `model.init_from`: that checkpoint's model with its weights and its own tokenizer
    (`tokenizer` unused): a vlp model directory, a BLIP checkpoint (fusion family) or a
    CLIPModel (clip family); parts a BLIP class lacks start from torch's RNG, so seed it
    first. Without: a from-scratch model of `model.family` sized by `cfg` with `tokenizer`.
    `temperature` (pretrain.temperature) initialises the contrastive temperature of a
    model that has none.
    """
    if cfg.init_from:
        kind = check_init_from(cfg)
        if kind == "vlp":
            return load_model(cfg.init_from)
        if kind == "blip":
            from vlp.models.blip import load_blip

            return load_blip(cfg.init_from, cfg, temperature)
        from vlp.models.clip import CLIPDualEncoder

        return CLIPDualEncoder.from_checkpoint(cfg.init_from, base=cfg)
    if tokenizer is None:
        raise ConfigError(f"a from-scratch {cfg.family} model needs a tokenizer")
    if cfg.family == "clip":
        from vlp.models.clip import build_clip

        return build_clip(cfg, tokenizer, temperature)
    from vlp.models.vlp_model import build_model

    return build_model(cfg, tokenizer, temperature=temperature)
