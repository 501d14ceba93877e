"""A ViTMAE checkpoint (masked-autoencoder pretraining) as the ViT image tower."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.checkpoints.mae import write_tiny_mae
from vlp.errors import ConfigError
from vlp.models.vlp_model import VLPModel, build_model


def mae_encoder_tokens(path, pixels: torch.Tensor) -> torch.Tensor:
    """ViTMAEModel's last_hidden_state with nothing masked, the patches in their own order."""
    from transformers import ViTMAEModel

    mae = ViTMAEModel.from_pretrained(str(path), mask_ratio=0.0).eval()
    n = mae.embeddings.patch_embeddings.num_patches
    # MAE shuffles the patches by `noise` even when it keeps them all: increasing noise
    # keeps them in place
    noise = torch.arange(n, dtype=torch.float32).expand(len(pixels), n)
    with torch.no_grad():
        out = mae(pixel_values=pixels, noise=noise)
    assert out.mask.sum() == 0 and torch.equal(out.ids_restore[0], torch.arange(n))
    return out.last_hidden_state


@pytest.mark.parametrize("encoder_only", [False, True], ids=["for_pretraining", "encoder"])
def test_vit_tower_from_mae_computes_the_mae_encoder(
    encoder_only, tiny_cfg, tokenizer, batch, tmp_path
):
    path = write_tiny_mae(tmp_path / "mae", encoder_only=encoder_only)
    m = build_model(tiny_cfg(image_tower="vit", image_pretrained=str(path)), tokenizer, 0.07).eval()
    tower = m.image_tower
    assert type(tower.backbone).__name__ == "ViTModel" and tower.model_type == "vit"
    assert not any("decoder" in name for name, _ in tower.named_parameters())
    pixels = batch["pixel_values"]
    ref = mae_encoder_tokens(path, pixels)
    with torch.no_grad():
        tokens = tower.backbone_tokens(pixels)
        seen, _ = m.encode_image(pixels)  # what the text layers cross-attend to
    assert tokens.shape == (len(pixels), 1 + (32 // 8) ** 2, 32)
    torch.testing.assert_close(tokens, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen, tower.norm(tower.proj(ref)), rtol=0, atol=1e-5)

    # MAE's fixed sin-cos table is the ViT's position table, now trained with the rest
    from transformers import ViTMAEModel

    mae = ViTMAEModel.from_pretrained(str(path))
    pos = tower.backbone.embeddings.position_embeddings
    assert torch.equal(pos.detach(), mae.embeddings.position_embeddings)
    assert pos.requires_grad

    # saved as a ViT: reloads from vlp's own directory without the MAE checkpoint
    m.save_pretrained(tmp_path / "vlp")
    meta = json.loads((tmp_path / "vlp" / "vlp_config.json").read_text())
    assert meta["image_config"]["model_type"] == "vit"
    loaded = VLPModel.from_pretrained(tmp_path / "vlp").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels)[0], seen, rtol=0, atol=0)


@pytest.mark.parametrize("tower", ["cnn", "convnext", "clip"])
def test_mae_checkpoint_is_only_a_vit_tower(tower, tiny_cfg, tokenizer, tmp_path):
    path = write_tiny_mae(tmp_path / "mae")
    with pytest.raises(ConfigError, match=f"model.image_tower: '{tower}'.*'vit_mae' model"):
        build_model(tiny_cfg(image_tower=tower, image_pretrained=str(path)), tokenizer, 0.07)


def test_mae_image_processor_travels_with_the_model(smoke_cfg, tmp_path):
    from transformers import ViTImageProcessor

    from vlp.data.images import image_transforms
    from vlp.data.processors import PROCESSOR_FILE, ProcessorTransform, save_processor

    path = write_tiny_mae(tmp_path / "mae", image_size=smoke_cfg.data.image_size)
    model = dataclasses.replace(smoke_cfg.model, image_tower="vit", image_pretrained=str(path))
    cfg = dataclasses.replace(smoke_cfg, model=model)
    transform = image_transforms(cfg)[0]
    assert isinstance(transform, ProcessorTransform)
    assert save_processor(cfg.model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / PROCESSOR_FILE).read_text())
    assert saved == json.loads((path / PROCESSOR_FILE).read_text())
    assert saved["image_mean"] == [0.4] * 3 and saved["image_std"] == [0.3] * 3
    assert ViTImageProcessor.from_pretrained(str(tmp_path / "out")).to_dict() == (
        ViTImageProcessor.from_pretrained(str(path)).to_dict()
    )
