"""The dual encoder family: transformers' `CLIPModel` behind vlp's encoding interface.

`CLIPDualEncoder` holds a `CLIPModel` (vision tower + text tower + projections + learnable
logit scale) and its tokenizer. It encodes as `VLPModel` does, so retrieval, zero-shot
evaluation and embedding export use either model unchanged:

- `encode_image(pixels) -> (image_embeds [B,1+N,Hv], image_feat [B,E])`,
- `encode_text(ids, mask) -> (text_embeds [B,T,Ht], text_feat [B,E])`,

where the features are `CLIPModel.get_image_features` / `get_text_features`, L2-normalised.
It has no fusion encoder and no decoder: it is trained with the contrastive loss alone
(`vlp.models.objectives.CLIPObjective`) and does neither captioning nor VQA.

The text tower pools the hidden state of the first end-of-text token (`eos_token_id` of the
text config; CLIP's legacy id 2 pools the largest id instead). A CLIP checkpoint keeps its own
tokenizer untouched; a model built from params uses vlp's trained WordPiece tokenizer, whose
closing [SEP] is the end-of-text token and [CLS] the start.

A model directory holds vlp_config.json (`model` with `family: clip`, and `clip_config`, the
`CLIPConfig`), model.safetensors and tokenizer/, so it reloads without its source checkpoint.

This module is the clip family's implementation (`vlp.models.family.FAMILIES`): `build`,
`load`, `fresh`, `reads_checkpoint`, `load_checkpoint`, `load_tokenizer` and `objective`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError
from vlp.models.patch_dropout import clip_vision_tokens
from vlp.models.tokenizer import local_dir
from vlp.models.towers import checkpoint_model_config
from vlp.models.weights import (
    CONFIG_NAME,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
    SavedModel,
    checkpoint_model_type,
    load_transformers,
    load_weights,
    require_weights,
    saved_model_config,
)

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

    from vlp.config import ModelConfig
    from vlp.models.objectives import ObjectiveWeights


class CLIPDualEncoder(SavedModel):
    """A transformers `CLIPModel` and its tokenizer, encoding as `VLPModel` does."""

    def __init__(
        self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, clip: CLIPModel
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.clip = clip
        self.has_patches = True
        self.patch_dropout = 0.0  # FLIP on the vision tower; the training loop sets it

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learnable log logit scale: similarities are multiplied by its exp."""
        return self.clip.logit_scale

    @property
    def temp(self) -> torch.Tensor:
        """The contrastive temperature, 1 / exp(logit_scale); also the model's device anchor."""
        return torch.exp(-self.clip.logit_scale)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,S,S] -> (vision tokens [B,1+N,Hv], image_feat [B,E] L2-normalised).

        Any S: the position table is interpolated when S is not the config's image size.
        Training with `patch_dropout` > 0: [B,1+K,Hv], K patches kept (`towers.drop_patches`).
        """
        rate = self.patch_dropout if self.training else 0.0
        if rate > 0:  # get_image_features' steps, patches dropped after the embeddings
            vision = self.clip.vision_model
            tokens = clip_vision_tokens(vision, pixel_values, rate)
            pooled = self.clip.visual_projection(vision.post_layernorm(tokens[:, 0]))
            return tokens, F.normalize(pooled, dim=-1)
        out = self.clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return out.last_hidden_state, F.normalize(out.pooler_output, dim=-1)

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tokens [B,1+N,Hv] of `encode_image` (the class token first)."""
        return self.encode_image(pixel_values)[0]

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B,T] -> (text tokens [B,T,Ht], text_feat [B,E] L2-normalised)."""
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, F.normalize(out.pooler_output, dim=-1)

    # ------------------------------------------------------------------ persistence
    def architecture_configs(self) -> dict[str, Any]:
        """The `CLIPConfig`."""
        return {"clip_config": self.clip.config.to_dict()}

    @classmethod
    def from_saved(
        cls,
        p: Path,
        meta: dict[str, Any],
        device: str | torch.device = "cpu",
        fresh: bool = False,
    ) -> CLIPDualEncoder:
        """`from_pretrained` of the local model directory `p` whose vlp_config.json is `meta`."""
        from transformers import CLIPConfig, CLIPModel

        if "clip_config" not in meta:
            raise ConfigError(f"{p}/{CONFIG_NAME}: lacks 'clip_config'; not a clip model")
        if not fresh:
            require_weights(p)
        cfg = saved_model_config(meta)
        tokenizer = load_clip_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
        model = cls(cfg, tokenizer, CLIPModel(CLIPConfig.from_dict(meta["clip_config"])))
        if not fresh:
            load_weights(model, p / WEIGHTS_NAME, device)
        return model.to(device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        base: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        key: str = "model.init_from",
    ) -> CLIPDualEncoder:
        """Load a transformers `CLIPModel` directory (config.json, weights, tokenizer files).

        The model's `cfg` describes the checkpoint's architecture; with `base` (the params'
        model section) its `max_text_length`, when set, caps the text length (with a warning
        when it cuts below the checkpoint's own). The tokenizer is the
        one saved beside the weights, unchanged.
        """
        from transformers import CLIPModel

        p = local_dir(path, key)
        if checkpoint_model_type(p) != "clip":
            raise ConfigError(f"{key}: {p} is not a transformers CLIPModel directory")
        clip = load_transformers(CLIPModel, p, key)
        tokenizer = load_clip_tokenizer(p, key)
        cfg = model_config_from_clip(clip.config, str(p), base)
        return cls(cfg, tokenizer, clip).to(device)


def is_clip_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a transformers CLIPModel directory (config.json model_type clip)."""
    return checkpoint_model_type(Path(path)) == "clip"


def load_clip_tokenizer(path: str | os.PathLike, key: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, as saved (no special tokens added: CLIP pools its EOS)."""
    from transformers import AutoTokenizer

    p = local_dir(path, key)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {p}: {e}") from e


def _bos_eos_pad(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """Start, end-of-text and padding ids: the special tokens the tokenizer wraps a text in.

    vlp's WordPiece tokenizer: [CLS] ... [SEP]; CLIP's: <|startoftext|> ... <|endoftext|>.
    """
    ids = tokenizer("a")["input_ids"]
    special = set(tokenizer.all_special_ids)
    if len(ids) < 3 or ids[0] not in special or ids[-1] not in special:
        raise ConfigError(
            "the clip family needs a tokenizer that wraps every text in start and "
            "end-of-text tokens (the text tower pools the end-of-text token)"
        )
    bos, eos = ids[0], ids[-1]
    if eos == 2 and eos != len(tokenizer) - 1:
        # CLIPTextModel pools the largest id when eos_token_id is 2 (its legacy configs)
        raise ConfigError("the clip family cannot pool an end-of-text token of id 2")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def clip_config(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> CLIPConfig:
    """A tiny from-scratch `CLIPConfig` from the params' model section.

    Text and vision towers share hidden_size, num_heads and intermediate_size; embed_dim is
    the projection size, max_text_length the text positions, the vocabulary the tokenizer's;
    the logit scale starts at log(1 / temperature).
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if temperature <= 0:
        raise ConfigError(f"model.temperature: must be > 0, got {temperature}")
    bos, eos, pad = _bos_eos_pad(tokenizer)
    common = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "projection_dim": cfg.embed_dim,
    }
    text = CLIPTextConfig(
        **common,
        vocab_size=len(tokenizer),
        num_hidden_layers=cfg.num_text_layers,
        max_position_embeddings=cfg.max_text_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    # image_size only sizes the position table; encode_image interpolates it to the input
    vision = CLIPVisionConfig(
        **common, num_hidden_layers=cfg.num_image_layers, image_size=64, patch_size=cfg.patch_size
    )
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=math.log(1.0 / temperature),
    )


def build_clip(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> CLIPDualEncoder:
    """A from-scratch CLIPDualEncoder sized by the params' model section (`clip_config`)."""
    from transformers import CLIPModel

    for key in ("image_pretrained", "text_pretrained"):
        if getattr(cfg, key):
            raise ConfigError(
                f"model.{key}: the clip family does not load single towers; "
                "name a whole CLIPModel directory in model.init_from"
            )
    try:
        config = clip_config(cfg, tokenizer, temperature)
    except ValueError as e:  # the config's own architecture checks
        raise ConfigError(f"model: not a valid CLIP architecture: {e}") from e
    return CLIPDualEncoder(cfg, tokenizer, CLIPModel(config))


def model_config_from_clip(
    config: CLIPConfig, source: str, base: ModelConfig | None = None
) -> ModelConfig:
    """The `ModelConfig` that describes a CLIP checkpoint (towers' sizes, text length).

    Sizes shared by both towers in vlp's params are the text tower's. `max_text_length` is
    the text positions unless `base.max_text_length` sets it.
    """
    return checkpoint_model_config(
        config, source, base, family="clip", image_tower="clip", embed_dim=config.projection_dim
    )


# ---------------------------------------------------------------- the clip family (vlp.models.family)
build = build_clip


def load(p: Path, meta: dict[str, Any], device: str | torch.device) -> CLIPDualEncoder:
    """The dual encoder saved in the vlp model directory `p` (`meta`: its vlp_config.json)."""
    return CLIPDualEncoder.from_saved(p, meta, device=device)


def fresh(p: Path, meta: dict[str, Any], temperature: float) -> CLIPDualEncoder:
    """The saved architecture and tokenizer, weights and logit scale (1 / temperature) fresh."""
    model = CLIPDualEncoder.from_saved(p, meta, fresh=True)
    with torch.no_grad():  # the architecture is the saved one; the scale starts fresh
        model.logit_scale.fill_(float(torch.log(torch.tensor(1.0 / temperature))))
    return model


def reads_checkpoint(p: Path, key: str) -> bool:
    """Whether `p` is a transformers CLIPModel directory."""
    return is_clip_checkpoint(p)


def load_checkpoint(
    p: Path, base: ModelConfig | None, temperature: float | None, key: str, as_is: bool
) -> CLIPDualEncoder:
    """The CLIPModel directory `p` as a dual encoder; it brings its own logit scale and heads."""
    return CLIPDualEncoder.from_checkpoint(p, base=base, key=key)


load_tokenizer = load_clip_tokenizer


def objective(model: CLIPDualEncoder, weights: ObjectiveWeights, local_loss: bool) -> Any:
    """CLIP's contrastive loss, weighted `weights.itc` (the only objective it trains)."""
    from vlp.models.objectives import CLIPObjective

    return CLIPObjective(model, weights.itc, local_loss=local_loss)
