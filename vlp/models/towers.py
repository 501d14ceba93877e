"""Image towers (transformers ResNet / ConvNeXt / ViT / CLIP vision) and BLIP text configs.

Every image tower returns a token sequence [B, 1 + N, H_text]: a global token first (ViT and
CLIP: the CLS token; CNN: the average-pooled feature map) and then one token per patch or CNN
feature-map cell, linearly projected to the text hidden size so the text layers can
cross-attend to it. CNN cells get a learned 2-D position embedding (interpolated to the
feature-map size, so any image size works) because spatial relations ("left of") need it;
ViT and CLIP interpolate their own position embeddings.

CLIP's vision transformer applies its final LayerNorm (`post_layernorm`) to the CLS token
only; the tower applies it to every token, as BLIP's and ALBEF's ViTs normalise all their
output tokens before the fusion layers read them. The CLS token is thus exactly CLIP's
`pooler_output`, and the patch tokens share its scale.

BLIP's own vision model (`BlipImageTower`, what a BLIP checkpoint brings) is the exception:
its tokens stay in the vision width, which BLIP's text layers cross-attend to directly.
`checkpoint_model_config` describes a transformers checkpoint with text and vision towers
(CLIP, BLIP) as the params' model section.

Patch dropout (FLIP): `vlp.models.patch_dropout`.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from vlp.errors import ConfigError
from vlp.models.patch_dropout import clip_vision_tokens, drop_patches, vit_tokens
from vlp.models.tokenizer import DEC_TOKEN, local_dir

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig, PretrainedConfig, PreTrainedModel

    from vlp.config import ModelConfig

IMAGE_TOWERS = ("cnn", "convnext", "vit", "clip")
# transformers model_type of a checkpoint -> the `model.image_tower` it is
TOWER_OF_MODEL_TYPE = {
    "resnet": "cnn",
    "convnext": "convnext",
    "vit": "vit",
    "vit_mae": "vit",  # a masked autoencoder (ViTMAE): its encoder is the tower, as a ViT
    "clip": "clip",  # a CLIPModel: its vision model is the tower
    "clip_vision_model": "clip",
}
TRANSFORMER_TYPES = ("vit", "clip_vision_model")  # model_types whose output is CLS + patches
POS_GRID = 8  # side of a learned position grid; resized to the actual token grid
# BLIP's vision config initialises weights with std 1e-10 (its weights always come from a
# checkpoint); a freshly initialised tower (the scratch ablation) uses ViT's 0.02 instead.
SCRATCH_VISION_INIT_RANGE = 0.02


def learned_positions(width: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(global token position [1, 1, width] zeros, cell grid [1, width, 8, 8] ~ N(0, 0.02^2))."""
    pos_global = nn.Parameter(torch.zeros(1, 1, width))
    pos_grid = nn.Parameter(torch.randn(1, width, POS_GRID, POS_GRID) * 0.02)
    return pos_global, pos_grid


def resize_positions(pos_grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A learned position grid bilinearly resized to `size` cells: [1, width, *size]."""
    return F.interpolate(pos_grid, size=size, mode="bilinear", align_corners=False)


def check_image_tower(tower: str) -> None:
    """ConfigError unless `tower` is one of IMAGE_TOWERS."""
    if tower not in IMAGE_TOWERS:
        raise ConfigError(f"model.image_tower: {tower!r} is not one of {', '.join(IMAGE_TOWERS)}")


def vit_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The transformers config sizes of a ViT tower of `cfg` (the ViT and MAE encoders')."""
    return {
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_image_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
    }


def image_backbone_config(cfg: ModelConfig) -> PretrainedConfig:
    """A tiny from-scratch transformers config for `cfg.image_tower`."""
    from transformers import CLIPVisionConfig, ConvNextConfig, ResNetConfig, ViTConfig

    check_image_tower(cfg.image_tower)
    if cfg.image_tower == "cnn":
        return ResNetConfig(
            embedding_size=cfg.cnn_channels[0],
            hidden_sizes=list(cfg.cnn_channels),
            depths=[1] * len(cfg.cnn_channels),
            layer_type="basic",
        )
    if cfg.image_tower == "convnext":
        return ConvNextConfig(
            hidden_sizes=list(cfg.cnn_channels),
            depths=[1] * len(cfg.cnn_channels),
            num_stages=len(cfg.cnn_channels),
        )
    # image_size only sizes the position table; forward interpolates it to the real size
    transformer = {"image_size": 64, **vit_sizes(cfg)}
    if cfg.image_tower == "clip":
        return CLIPVisionConfig(**transformer, attention_dropout=0.0)
    return ViTConfig(**transformer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def backbone_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """Instantiate the bare backbone (no heads) for a ResNet / ConvNeXt / ViT / CLIP vision config."""
    from transformers import AutoModel, CLIPVisionModel, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    if config.model_type == "clip_vision_model":
        return CLIPVisionModel(config)
    return AutoModel.from_config(config)


def vit_config_of_mae(config: PretrainedConfig) -> PretrainedConfig:
    """The ViTConfig of a ViTMAE encoder: same sizes, patches, norms and dropouts."""
    from transformers import ViTConfig

    keys = (
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "initializer_range",
        "layer_norm_eps",
        "qkv_bias",
    )
    return ViTConfig(**{k: getattr(config, k) for k in keys})


def vit_from_mae(path: str) -> PreTrainedModel:
    """The encoder of a ViTMAE checkpoint (ViTMAEForPreTraining or ViTMAEModel) as a ViTModel.

    ViTMAEModel's modules and parameter names are ViTModel's (the pre-training model keeps
    them under `vit.`, which `from_pretrained` strips); the decoder is dropped. MAE's fixed
    sin-cos position embeddings become the ViT's position table, trained from then on. Run
    on all patches in their order, the ViT computes what the MAE encoder computes unmasked.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

    saved = ViTMAEConfig.from_pretrained(path, local_files_only=True).architectures or []
    if "ViTMAEForPreTraining" in saved:  # loaded whole: the decoder's weights are expected
        mae = ViTMAEForPreTraining.from_pretrained(path, local_files_only=True).vit
    else:
        mae = ViTMAEModel.from_pretrained(path, local_files_only=True)
    vit = ViTModel(vit_config_of_mae(mae.config), add_pooling_layer=False)
    vit.load_state_dict(mae.state_dict(), strict=True)  # copies values; the ViT's stay trainable
    return vit


def load_backbone(path: str, tower: str) -> PreTrainedModel:
    """Load the `tower` backbone saved with `save_pretrained` in a local directory.

    `tower` is `model.image_tower`; the checkpoint must be of that kind (TOWER_OF_MODEL_TYPE).
    A CLIPModel directory gives its vision model; a ViTMAE directory its encoder, as a ViT
    (`vit_from_mae`).
    """
    from transformers import AutoConfig, AutoModel, CLIPModel, CLIPVisionModel, ViTModel

    p = local_dir(path, "model.image_pretrained")
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.image_pretrained: no transformers config in {p}: {e}") from e
    check_image_tower(tower)
    kind = TOWER_OF_MODEL_TYPE.get(config.model_type)
    if kind is None:
        raise ConfigError(
            f"model.image_pretrained: {p} holds a {config.model_type!r} model; expected one of "
            f"{', '.join(TOWER_OF_MODEL_TYPE)}"
        )
    if kind != tower:
        raise ConfigError(
            f"model.image_tower: {tower!r} does not match model.image_pretrained {p}, which "
            f"holds a {config.model_type!r} model (model.image_tower: {kind})"
        )
    if config.model_type == "vit":
        return ViTModel.from_pretrained(str(p), add_pooling_layer=False, local_files_only=True)
    if config.model_type == "vit_mae":
        return vit_from_mae(str(p))
    if config.model_type == "clip":
        return CLIPModel.from_pretrained(str(p), local_files_only=True).vision_model
    if config.model_type == "clip_vision_model":
        return CLIPVisionModel.from_pretrained(str(p), local_files_only=True)
    return AutoModel.from_pretrained(str(p), local_files_only=True)


def backbone_width(config: PretrainedConfig) -> int:
    """Channels (CNN, last stage) or hidden size (ViT, CLIP) of the backbone output."""
    if config.model_type in TRANSFORMER_TYPES:
        return config.hidden_size
    return config.hidden_sizes[-1]


class ImageTower(nn.Module):
    """A transformers vision backbone whose output becomes a token sequence in the text width."""

    def __init__(self, backbone: PreTrainedModel, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.model_type = backbone.config.model_type
        self.out_dim = out_dim  # the width of the tokens it returns
        width = backbone_width(backbone.config)
        self.proj = nn.Linear(width, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.has_patches = self.model_type in TRANSFORMER_TYPES
        self.patch_dropout = 0.0  # FLIP; the training loop sets it (`set_patch_dropout`)
        if not self.has_patches:
            # index 0 is the pooled token, the grid the feature-map cells
            self.pos_global, self.pos_grid = learned_positions(width)

    def backbone_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images -> [B, 1 + N, width] backbone tokens, before the projection.

        Training with `patch_dropout` > 0 (ViT, CLIP): [B, 1 + K, width], K patches kept.
        """
        rate = self.patch_dropout if self.training else 0.0
        if rate > 0 and self.model_type == "vit":
            return vit_tokens(self.backbone, pixel_values, rate)
        if rate > 0 and self.model_type == "clip_vision_model":
            tokens = clip_vision_tokens(self.backbone, pixel_values, rate)
            return self.backbone.post_layernorm(tokens)
        if self.model_type == "vit":
            return self.backbone(
                pixel_values=pixel_values, interpolate_pos_encoding=True
            ).last_hidden_state
        if self.model_type == "clip_vision_model":
            out = self.backbone(pixel_values=pixel_values, interpolate_pos_encoding=True)
            return self.backbone.post_layernorm(out.last_hidden_state)
        out = self.backbone(pixel_values=pixel_values)
        fmap = out.last_hidden_state  # [B, C, h, w]
        pos = resize_positions(self.pos_grid, tuple(fmap.shape[-2:]))
        cells = (fmap + pos).flatten(2).transpose(1, 2)  # [B, h*w, C]
        # the backbone's own pooler (ResNet: average; ConvNeXt: average + LayerNorm)
        pooled = out.pooler_output.flatten(1).unsqueeze(1) + self.pos_global
        return torch.cat([pooled, cells], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images -> [B, 1 + N, out_dim] tokens, the global token first."""
        return self.norm(self.proj(self.backbone_tokens(pixel_values)))


def build_image_tower(cfg: ModelConfig, out_dim: int) -> ImageTower:
    """The image tower `cfg` describes (from `image_pretrained` if set, else tiny from scratch)."""
    if cfg.image_pretrained:
        backbone = load_backbone(cfg.image_pretrained, cfg.image_tower)
    else:
        backbone = backbone_from_config(image_backbone_config(cfg))
    return ImageTower(backbone, out_dim)


def text_config(cfg: ModelConfig, tokenizer: Any) -> BlipTextConfig:
    """A tiny BlipTextConfig matching `cfg` and the tokenizer's vocabulary and special ids."""
    from transformers import BlipTextConfig

    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"model.hidden_size ({cfg.hidden_size}) must be a multiple of model.num_heads ({cfg.num_heads})"
        )
    return BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        encoder_hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_text_layers,
        num_attention_heads=cfg.num_heads,
        # headroom beyond max_text_length for decoding longer outputs than training texts
        max_position_embeddings=max(cfg.max_text_length, 64),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # [DEC] starts every decoded text; sep is the token the tokenizer ends texts with
        bos_token_id=tokenizer.convert_tokens_to_ids(DEC_TOKEN),
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        is_decoder=True,  # builds the cross-attention layers; each forward picks the mask
    )


def text_config_from_pretrained(path: str, cfg: ModelConfig, tokenizer: Any) -> BlipTextConfig:
    """A BlipTextConfig shaped like the BERT / BLIP-text model saved in a local directory."""
    from transformers import AutoConfig

    p = local_dir(path, "model.text_pretrained")
    try:
        src = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text_pretrained: no transformers config in {p}: {e}") from e
    if src.model_type not in ("bert", "blip_text_model"):
        raise ConfigError(
            f"model.text_pretrained: {p} holds a {src.model_type!r} model; expected bert or blip_text_model"
        )
    out = text_config(cfg, tokenizer)
    # vocab_size too: the checkpoint's embeddings load as saved, then resize to the tokenizer
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
    ):
        setattr(out, key, getattr(src, key))
    out.encoder_hidden_size = src.hidden_size
    return out


def fold_token_type_embeddings(text_model: nn.Module, path: str) -> None:
    """Make a BlipTextModel loaded from a local BERT checkpoint compute BERT's embeddings exactly.

    BERT adds `token_type_embeddings[token_type_id]` to word + position embeddings before its
    LayerNorm; BLIP's text embeddings have no token types. vlp's texts are all type 0, so adding
    row 0 to every position embedding gives the same sum. A blip_text_model checkpoint has
    nothing to fold.
    """
    from transformers import AutoConfig, BertModel

    p = local_dir(path, "model.text_pretrained")
    if AutoConfig.from_pretrained(str(p), local_files_only=True).model_type != "bert":
        return
    bert = BertModel.from_pretrained(str(p), add_pooling_layer=False, local_files_only=True)
    row = bert.embeddings.token_type_embeddings.weight[0]
    with torch.no_grad():
        text_model.embeddings.position_embeddings.weight.add_(row)


class BlipImageTower(nn.Module):
    """transformers' BlipVisionModel: [B, 3, S, S] -> [B, 1 + N, vision width], CLS first.

    Its last_hidden_state (after BLIP's post-LayerNorm) is the image token sequence, as BLIP
    feeds it to its text layers; position embeddings are interpolated to other image sizes.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = backbone.config.hidden_size
        self.has_patches = True
        self.patch_dropout = 0.0  # FLIP; the training loop sets it (`set_patch_dropout`)

    @classmethod
    def from_config(cls, config: BlipVisionConfig, fresh: bool = False) -> BlipImageTower:
        """A tower of `config`'s shape; `fresh`: weights to train from (std 0.02, not 1e-10)."""
        from transformers import BlipVisionModel

        if fresh:
            config = config.__class__.from_dict(
                {**config.to_dict(), "initializer_range": SCRATCH_VISION_INIT_RANGE}
            )
        return cls(BlipVisionModel(config))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + N, width]; [B, 1 + K, width] with patch dropout in training."""
        rate = self.patch_dropout if self.training else 0.0
        if rate > 0:  # BlipVisionModel.forward's steps, patches dropped after the embeddings
            bb = self.backbone
            hidden = drop_patches(bb.embeddings(pixel_values, interpolate_pos_encoding=True), rate)
            return bb.post_layernorm(bb.encoder(inputs_embeds=hidden).last_hidden_state)
        return self.backbone(
            pixel_values=pixel_values, interpolate_pos_encoding=True
        ).last_hidden_state


def image_tower_from_config(config: PretrainedConfig, text_width: int, fresh: bool) -> nn.Module:
    """The image tower a saved backbone config describes: BLIP's vision model as is, else
    vlp's `ImageTower` projecting to `text_width`. `fresh`: a BLIP tower's weights to train
    from (std 0.02, not 1e-10); vlp's towers initialise as they always do."""
    if config.model_type == "blip_vision_model":
        return BlipImageTower.from_config(config, fresh=fresh)
    return ImageTower(backbone_from_config(config), text_width)


def checkpoint_text_length(own: int, base: ModelConfig | None, source: str | os.PathLike) -> int:
    """The text length of a checkpoint whose text positions are `own`: its own unless the
    params' `base.max_text_length` is set, which wins; a warning says when it cuts the
    checkpoint's texts short (the same weights then score differently)."""
    if base is None or base.max_text_length is None:
        return own
    if base.max_text_length < own:
        warnings.warn(
            f"model.max_text_length: {base.max_text_length} cuts the texts of {source} below "
            f"its own {own} tokens; set it to null to read texts as the checkpoint does",
            stacklevel=2,
        )
    return min(own, base.max_text_length)


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
    the text positions unless `base.max_text_length` sets it (`checkpoint_text_length`).
    """
    from vlp.config import ModelConfig

    text, vision = config.text_config, config.vision_config
    length = checkpoint_text_length(text.max_position_embeddings, base, source)
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
        temperature=None,
    )
