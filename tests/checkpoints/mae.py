"""A tiny random transformers ViTMAE directory (what `vlp pretrain-vision` writes), with its
ViTImageProcessor."""

from __future__ import annotations

from pathlib import Path


def write_tiny_mae(
    path: Path,
    image_size: int = 32,
    seed: int = 0,
    hidden_size: int = 32,
    encoder_only: bool = False,
) -> Path:
    """A random ViTMAEForPreTraining (or its encoder alone, ViTMAEModel) saved in `path`.

    Patch 8, one encoder layer of `hidden_size` (2 heads), a one-layer decoder of width 16;
    mask ratio 0.75, as MAE trains. The processor squashes to `image_size` with mean 0.4 and
    std 0.3 (not the 0.5 vlp's own transform uses, so a test sees whose pixels it got).
    """
    import torch
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

    config = ViTMAEConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        mask_ratio=0.75,
    )
    torch.manual_seed(seed)
    model = (ViTMAEModel if encoder_only else ViTMAEForPreTraining)(config)
    # random LayerNorm affines: a loader that left them at their init would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "cls_token" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(path))
    ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.4, 0.4, 0.4],
        image_std=[0.3, 0.3, 0.3],
    ).save_pretrained(str(path))
    return path
