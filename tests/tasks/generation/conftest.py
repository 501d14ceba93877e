"""A tiny random Stable Diffusion pipeline directory, built locally (nothing downloaded)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

# CLIP's byte-level BPE over single letters: every lowercase word tokenizes, no merges needed.
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_VOCAB = [*_SPECIAL, *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
TEXT_LENGTH = 16


def _tiny_clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(_VOCAB)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=TEXT_LENGTH)


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved StableDiffusionPipeline of random tiny parts: 16 px images, 8 px latents.

    UNet (32, 64) channels with cross-attention in its lower block, a 2x AutoencoderKL, a
    2-layer CLIP text encoder of width 32 over a letter vocabulary, SD's PNDM scheduler;
    no safety checker. Read-only: copy it before changing it.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(_VOCAB),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_clip_tokenizer(root / "tokenizer_files"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "pipeline")
    return root / "pipeline"
