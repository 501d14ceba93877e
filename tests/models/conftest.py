"""Tiny tokenizer, model configs, model and batch for the model tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlp.config import ModelConfig, load_config

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles above a small yellow star",
    "a big blue square",
    "a yellow star right of a red circle",
    "what colour is the circle?",
    "yes",
    "no",
]


def _tiny_cfg(**over: object) -> ModelConfig:
    """params.yaml's model section, shrunk, with `over` applied."""
    base = dataclasses.asdict(load_config(PARAMS).model)
    base.update(
        hidden_size=32,
        intermediate_size=64,
        embed_dim=16,
        num_heads=2,
        num_text_layers=1,
        num_image_layers=1,
        cnn_channels=[8, 16, 32],
        patch_size=8,
        max_text_length=16,
    )
    base.update(over)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_cfg():
    """Factory of model configs small enough that a forward pass takes milliseconds."""
    return _tiny_cfg


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def tokenizer():
    from vlp.models.tokenizer import train_tokenizer

    return train_tokenizer(CAPTIONS * 3, vocab_size=120)


IMAGE = 32


@pytest.fixture
def batch(tokenizer, captions):
    """Six (image, caption) pairs over five images: captions 0 and 1 share an image."""
    import torch

    from vlp.data.torch_data import make_pretrain_collate

    torch.manual_seed(0)
    items = [
        {
            "pixel_values": torch.rand(3, IMAGE, IMAGE) * 2 - 1,
            "caption": captions[i],
            "image_id": f"img{i // 2 if i in (0, 1) else i}",
            "caption_id": i,
        }
        for i in range(6)
    ]
    items[1]["pixel_values"] = items[0]["pixel_values"]
    return make_pretrain_collate(tokenizer, max_length=16)(items)


@pytest.fixture
def model(tiny_cfg, tokenizer):
    """A tiny VLPModel with seed-0 weights."""
    import torch

    from vlp.models.vlp_model import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg(), tokenizer, 0.07)
