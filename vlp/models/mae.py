"""The masked autoencoder of visual pretraining: transformers' `ViTMAEForPreTraining`.

`build_mae` sizes a fresh one from params (the encoder as `model`'s ViT tower, the decoder
and masking as `pretrain_vision` says); `load_mae` continues a local ViTMAE checkpoint,
refusing any other directory. Both run at the image size of the stage's transform: a
checkpoint trained at another size gets its fixed sin-cos position tables rebuilt for the
new patch grid (MAE learns no position embedding, so no weight is lost).
`image_processor` is the transformers image processor saved beside the model, which
preprocesses as the stage's evaluation transform does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError
from vlp.models.towers import vit_sizes

if TYPE_CHECKING:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from vlp.config import ModelConfig, PretrainVisionConfig
    from vlp.data.images import Transform

MAE_MODEL_TYPE = "vit_mae"
# position tables that depend on the patch grid: fixed sin-cos, never learned
GRID_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def mae_config(model: ModelConfig, pv: PretrainVisionConfig, image_size: int) -> ViTMAEConfig:
    """A from-scratch ViTMAE config: `model`'s ViT encoder sizes, `pretrain_vision`'s decoder."""
    from transformers import ViTMAEConfig

    for key, width, heads in (
        ("model.hidden_size", model.hidden_size, model.num_heads),
        ("pretrain_vision.decoder_hidden_size", pv.decoder_hidden_size, pv.decoder_num_heads),
    ):
        if width % heads:
            raise ConfigError(f"{key}: {width} is not divisible by its {heads} attention heads")
    return ViTMAEConfig(
        image_size=image_size,
        **vit_sizes(model),
        decoder_hidden_size=pv.decoder_hidden_size,
        decoder_num_hidden_layers=pv.decoder_num_layers,
        decoder_num_attention_heads=pv.decoder_num_heads,
        decoder_intermediate_size=pv.decoder_intermediate_size,
        mask_ratio=pv.mask_ratio,
        norm_pix_loss=pv.norm_pix_loss,
    )


def check_mae_checkpoint(directory: str | os.PathLike, key: str) -> ViTMAEConfig:
    """The config of a local ViTMAE checkpoint; ConfigError naming `key` for anything else."""
    from transformers import AutoConfig

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}: {str(directory)!r} is not a local directory")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: {path} is not a transformers checkpoint ({reason})") from None
    if config.model_type != MAE_MODEL_TYPE:
        raise ConfigError(
            f"{key}: {path} is a {config.model_type!r} checkpoint, not a ViTMAE one "
            f"(model_type {MAE_MODEL_TYPE!r}, e.g. facebook/vit-mae-base saved locally)"
        )
    return config


def check_grid(image_size: int, patch_size: int, mask_ratio: float, key: str) -> int:
    """The number of patches of an image; ConfigError unless masking keeps some and hides some."""
    if image_size % patch_size:
        raise ConfigError(
            f"{key}: images of {image_size} px do not divide into patches of {patch_size} px"
        )
    n = (image_size // patch_size) ** 2
    kept = int(n * (1 - mask_ratio))  # as ViTMAEEmbeddings.random_masking counts
    if not 1 <= kept < n:
        raise ConfigError(
            f"pretrain_vision.mask_ratio: {mask_ratio} keeps {kept} of the {n} patches of a "
            f"{image_size} px image; it must keep at least one and hide at least one"
        )
    return n


def build_mae(
    model: ModelConfig, pv: PretrainVisionConfig, image_size: int
) -> ViTMAEForPreTraining:
    """A freshly initialised masked autoencoder (seed torch first for the same weights)."""
    from transformers import ViTMAEForPreTraining

    return ViTMAEForPreTraining(mae_config(model, pv, image_size))


def load_mae(
    directory: str | os.PathLike,
    key: str,
    image_size: int,
    mask_ratio: float,
    norm_pix_loss: bool,
) -> ViTMAEForPreTraining:
    """The ViTMAE checkpoint `directory`, to train at `image_size` with the given masking.

    At another size than the checkpoint's, the weights move into a model built for the new
    grid, whose sin-cos tables (`GRID_TABLES`) are the ones for that grid.
    """
    from transformers import ViTMAEForPreTraining

    config = check_mae_checkpoint(directory, key)
    overrides = {"mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss}
    loaded = ViTMAEForPreTraining.from_pretrained(
        str(Path(directory).expanduser()), local_files_only=True, **overrides
    )
    if _side(config.image_size) == image_size:
        return loaded
    config = loaded.config.__class__.from_dict(
        {**loaded.config.to_dict(), "image_size": image_size}
    )
    resized = ViTMAEForPreTraining(config)
    state = {k: v for k, v in loaded.state_dict().items() if k not in GRID_TABLES}
    missing, unexpected = resized.load_state_dict(state, strict=False)
    assert sorted(missing) == sorted(GRID_TABLES) and not unexpected, (missing, unexpected)
    return resized


def _side(size: Any) -> int | None:
    """A square image size as one int (ViTMAEConfig allows an int or a pair)."""
    if isinstance(size, list | tuple):
        return int(size[0]) if len(set(size)) == 1 else None
    return int(size)


def image_processor(transform: Transform) -> Any:
    """The transformers image processor that preprocesses as `transform` does.

    A checkpoint's processor as the stage resolved it; for vlp's own transform, a
    `ViTImageProcessor` (size, bicubic resampling, mean, std) when it squashes, or the
    transform's own CLIP processor when it crops the centre (the ViT one cannot crop).
    """
    from PIL import Image
    from transformers import ViTImageProcessorPil

    from vlp.data.images import ImageTransform

    if not isinstance(transform, ImageTransform) or transform.resize != "squash":
        return transform.processor
    return ViTImageProcessorPil(
        size={"height": transform.size, "width": transform.size},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )
