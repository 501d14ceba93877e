"""Activation checkpointing of the towers: same gradients, fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from vlp.data.torch_data import make_pretrain_collate
from vlp.models.activation_checkpointing import enable_activation_checkpointing
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.models.vlp_model import build_model

ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)


def _batch(tokenizer, captions):
    g = torch.Generator().manual_seed(0)
    items = [
        {"pixel_values": torch.rand(3, 32, 32, generator=g), "caption": c, "image_id": f"i{i}"}
        for i, c in enumerate(captions[:4])
    ]
    return make_pretrain_collate(tokenizer, 16)(items)


def _step(objective, batch) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one training step, and the elements autograd saved for the backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    objective.zero_grad()
    torch.manual_seed(1)  # same ITM negatives and dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective(**batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return grads, saved


@pytest.mark.parametrize("tower", ["vit", "convnext"])
def test_checkpointing_keeps_gradients_and_saves_less(tower, tiny_cfg, tokenizer, captions):
    torch.manual_seed(0)
    cfg = tiny_cfg(image_tower=tower, num_text_layers=2, num_image_layers=2)
    model = build_model(cfg, tokenizer, 0.07).train()
    for module in model.modules():  # the recompute must replay the same dropout masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    objective = VLPObjective(model, ALL, local_loss=True)
    batch = _batch(tokenizer, captions)
    plain, saved_plain = _step(objective, batch)

    applied = enable_activation_checkpointing(objective)
    assert {"model.text_encoder", "model.text_decoder", "model.image_tower.backbone"} <= set(
        applied
    )
    checkpointed, saved_ckpt = _step(objective, batch)
    assert saved_ckpt < 0.8 * saved_plain
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_resnet_tower_is_left_alone_with_a_warning(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg(image_tower="cnn"), tokenizer, 0.07)
    with pytest.warns(UserWarning, match="image_tower.backbone .*BatchNorm"):
        applied = enable_activation_checkpointing(model)
    assert set(applied) == {"text_encoder", "text_decoder"}
