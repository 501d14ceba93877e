"""Patch dropout (FLIP) in the ViT, CLIP and BLIP image towers and the CLIP dual encoder."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.models.patch_dropout import drop_patches, kept_patches, set_patch_dropout
from vlp.models.towers import BlipImageTower
from vlp.models.vlp_model import build_model

ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)


def _blip_tower() -> BlipImageTower:
    from transformers import BlipVisionConfig

    config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return BlipImageTower.from_config(config, fresh=True)


def _towers(tiny_cfg, tokenizer) -> dict[str, torch.nn.Module]:
    """Every kind of tower with patch tokens, seed-0 weights."""
    from vlp.models.clip import build_clip

    torch.manual_seed(0)
    return {
        "vit": build_model(tiny_cfg(image_tower="vit"), tokenizer, 0.07).image_tower,
        "clip": build_model(tiny_cfg(image_tower="clip"), tokenizer, 0.07).image_tower,
        "blip": _blip_tower(),
        "clip_dual_encoder": build_clip(tiny_cfg(family="clip"), tokenizer, 0.07),
    }


def _tokens(tower: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image token sequence of any tower (the dual encoder's `encode_image` tokens)."""
    if hasattr(tower, "encode_image"):
        return tower.encode_image(images)[0]
    return tower(images)


@pytest.mark.parametrize("n,rate,kept", [(16, 0.5, 8), (16, 0.75, 4), (9, 0.5, 5), (64, 0.1, 58)])
def test_kept_patches_is_n_minus_rounded_drops(n, rate, kept):
    assert kept_patches(n, rate) == kept
    assert kept_patches(4, 0.99) == 1  # never no patch at all


def test_drop_patches_keeps_cls_and_an_ordered_subset_per_image():
    torch.manual_seed(0)
    b, n, w = 6, 16, 4
    tokens = torch.arange(b * (1 + n), dtype=torch.float).view(b, 1 + n, 1).expand(b, 1 + n, w)
    out = drop_patches(tokens, 0.5)
    assert out.shape == (b, 1 + 8, w)
    assert torch.equal(out[:, 0], tokens[:, 0])  # the CLS token first, always
    positions = out[:, 1:, 0] - tokens[:, :1, 0]  # which patch (1..n) each kept token was
    assert (positions >= 1).all() and (positions <= n).all()
    assert (positions.diff(dim=1) > 0).all()  # distinct, in their original order
    assert len({tuple(p.tolist()) for p in positions}) == b  # each image draws its own


def test_draws_follow_torchs_seed():
    tokens = torch.randn(4, 17, 8)
    torch.manual_seed(1)
    a = drop_patches(tokens, 0.5)
    torch.manual_seed(1)
    b = drop_patches(tokens, 0.5)
    torch.manual_seed(2)
    c = drop_patches(tokens, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["vit", "clip", "blip", "clip_dual_encoder"])
def test_eval_output_ignores_the_rate(kind, tiny_cfg, tokenizer):
    tower = _towers(tiny_cfg, tokenizer)[kind].eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = _tokens(tower, images)
        assert set_patch_dropout(tower, 0.5) == 1
        masked_eval = _tokens(tower, images)
    assert torch.equal(plain, masked_eval)  # bit-identical: the transformers forward as is
    assert plain.shape[1] == 1 + 16


@pytest.mark.parametrize("kind", ["vit", "clip", "blip", "clip_dual_encoder"])
@pytest.mark.parametrize("size,rate", [(32, 0.5), (32, 0.75), (40, 0.5), (48, 0.3)])
def test_training_keeps_exactly_the_rounded_count(kind, size, rate, tiny_cfg, tokenizer):
    tower = _towers(tiny_cfg, tokenizer)[kind].train()
    set_patch_dropout(tower, rate)
    n = (size // 8) ** 2
    out = _tokens(tower, torch.rand(2, 3, size, size))
    assert out.shape[:2] == (2, 1 + kept_patches(n, rate))


@pytest.mark.parametrize("kind", ["vit", "clip", "blip", "clip_dual_encoder"])
def test_masked_path_keeping_every_patch_equals_the_models_forward(kind, tiny_cfg, tokenizer):
    """The composed layers are the transformers forward's: a rate that drops no patch of 16
    (round(0.01 * 16) = 0) gives the unmasked output, features included."""
    tower = _towers(tiny_cfg, tokenizer)[kind].train()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = tower.encode_image(images) if kind == "clip_dual_encoder" else tower(images)
        set_patch_dropout(tower, 0.01)
        composed = tower.encode_image(images) if kind == "clip_dual_encoder" else tower(images)
    torch.testing.assert_close(composed, plain, rtol=0, atol=1e-6)


def test_cnn_towers_refuse_a_rate(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg(image_tower="cnn"), tokenizer, 0.07)
    with pytest.raises(ConfigError, match="no patch tokens"):
        set_patch_dropout(model, 0.5)
    assert set_patch_dropout(model, 0.0) == 1


def _train_steps(tiny_cfg, tokenizer, batch, seed: int, rate: float) -> dict[str, torch.Tensor]:
    """Three AdamW steps of all objectives on a seed-0 ViT model, torch seeded `seed`."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(image_tower="vit"), tokenizer, 0.07)
    set_patch_dropout(model, rate)
    objective = VLPObjective(model, ALL, local_loss=False).train()
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    for _ in range(3):
        objective(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.image_tower.state_dict().items()}


def test_seeded_training_is_reproducible_and_the_seed_picks_the_masks(tiny_cfg, tokenizer, batch):
    a = _train_steps(tiny_cfg, tokenizer, batch, seed=1, rate=0.5)
    b = _train_steps(tiny_cfg, tokenizer, batch, seed=1, rate=0.5)
    c = _train_steps(tiny_cfg, tokenizer, batch, seed=2, rate=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_itm_and_lm_read_the_kept_tokens(tiny_cfg, tokenizer, batch):
    """Every objective trains on the shorter sequence; the fused text sees K + 1 tokens."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(image_tower="vit"), tokenizer, 0.07)
    set_patch_dropout(model, 0.75)
    lengths: dict[str, set[int]] = {"text_encoder": set(), "text_decoder": set()}
    for name in lengths:

        def record(module, args, kwargs, out, name=name):
            if kwargs.get("encoder_hidden_states") is not None:
                lengths[name].add(kwargs["encoder_hidden_states"].shape[1])

        getattr(model, name).register_forward_hook(record, with_kwargs=True)
    out = VLPObjective(model, ALL, local_loss=False).train()(**batch)
    out["loss"].backward()
    assert {k for k in out if k.startswith("loss_")} >= {"loss_itc", "loss_itm", "loss_lm"}
    kept = 1 + kept_patches(16, 0.75)
    assert lengths == {"text_encoder": {kept}, "text_decoder": {kept}}  # ITM and LM


def test_activation_checkpointing_gives_the_same_gradients(tiny_cfg, tokenizer, batch):
    from vlp.models.activation_checkpointing import enable_activation_checkpointing

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(image_tower="vit"), tokenizer, 0.07)
        if checkpointed:
            enable_activation_checkpointing(model)
        set_patch_dropout(model, 0.5)
        torch.manual_seed(3)
        VLPObjective(model, ALL, local_loss=False).train()(**batch)["loss"].backward()
        grads.append([p.grad.clone() for p in model.image_tower.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
