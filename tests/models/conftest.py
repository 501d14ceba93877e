"""Tiny tokenizer and model configs for the model tests."""

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
