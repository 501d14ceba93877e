"""The masked autoencoder's pieces: its image processor, its patch grid, a checkpoint resized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.images import ImageTransform
from vlp.data.processors import ProcessorTransform
from vlp.errors import ConfigError
from vlp.models.mae import GRID_TABLES, check_grid, image_processor, load_mae


@pytest.mark.parametrize("resize", ["squash", "shorter_side_crop"])
def test_the_saved_processor_preprocesses_as_the_transform(resize: str, tmp_path: Path) -> None:
    transform = ImageTransform(24, resize, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    image_processor(transform).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 60), (61, 33), (24, 24))
    ]
    saved = ProcessorTransform.load(tmp_path, "saved")
    assert saved.size == 24
    assert torch.equal(saved.pixels(images), transform.pixels(images))


def test_the_grid_must_divide_and_the_mask_must_keep_and_hide_patches() -> None:
    assert check_grid(32, 8, 0.75, "images.size") == 16
    with pytest.raises(ConfigError, match="images.size: images of 30 px"):
        check_grid(30, 8, 0.75, "images.size")
    with pytest.raises(ConfigError, match="pretrain_vision.mask_ratio: 0.95 keeps 0 of the 16"):
        check_grid(32, 8, 0.95, "images.size")
    with pytest.raises(ConfigError, match="pretrain_vision.mask_ratio: 0.0 keeps 16 of the 16"):
        check_grid(32, 8, 0.0, "images.size")


def test_a_checkpoint_moves_to_another_image_size_with_its_learned_weights(
    tmp_path: Path,
) -> None:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    config = ViTMAEConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, decoder_hidden_size=8,
        decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=16,
    )  # fmt: skip
    ViTMAEForPreTraining(config).save_pretrained(tmp_path)
    start = ViTMAEForPreTraining.from_pretrained(tmp_path).state_dict()
    same = load_mae(tmp_path, "init", 16, 0.5, False)
    assert same.config.mask_ratio == 0.5 and not same.config.norm_pix_loss
    moved = load_mae(tmp_path, "init", 32, 0.5, False)
    assert moved.config.image_size == 32 and moved.config.mask_ratio == 0.5
    state = moved.state_dict()
    assert all(torch.equal(start[k], state[k]) for k in start if k not in GRID_TABLES)
    assert state["vit.embeddings.position_embeddings"].shape[1] == 1 + 16
    # a 32 px image goes through: the grid tables match the new patch grid
    out = moved(pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 16, 8 * 8 * 3)
