"""A tiny tokenizer and randomly initialised smoke-size VLPModel for task unit tests."""

from __future__ import annotations

import pytest

from vlp.config import Config


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from vlp.models import train_tokenizer

    texts = [
        "a red circle at the top left",
        "is there a red circle?",
        "how many shapes are there?",
        "what color is the small square?",
        "a blue square to the left of a green triangle",
    ] * 4
    return train_tokenizer(texts, 120)


@pytest.fixture
def tiny_vlp(smoke_cfg: Config, tiny_tokenizer):
    import torch

    from vlp.models import build_model

    torch.manual_seed(0)
    return build_model(smoke_cfg.model, tiny_tokenizer, 0.07)
