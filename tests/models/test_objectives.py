"""Training objectives: ITC, ITM with hard negatives, LM, and their weighted sum."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.objectives import (
    ObjectiveWeights,
    VLPObjective,
    itc_loss,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
)

ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)
ITC_ONLY = ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0)


@pytest.mark.slow
def test_losses_decrease_on_a_fixed_batch(model, batch):
    objective = VLPObjective(model, ALL, local_loss=True)
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        out = objective(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in out.items()}
    last = {k: v.item() for k, v in objective(**batch).items()}
    for k in ("loss", "loss_itc", "loss_lm"):
        assert last[k] < first[k] * 0.9, (k, first[k], last[k])
    assert last["loss_itm"] < first["loss_itm"]


def test_objective_is_the_weighted_sum_of_the_individual_losses(model, batch):
    model.eval()  # no dropout: the two computations below see the same network
    weights = ObjectiveWeights(itc=0.5, itm=2.0, lm=0.25)
    torch.manual_seed(1)  # ITM draws its hard negatives from torch's RNG
    out = VLPObjective(model, weights, local_loss=True)(**batch)

    torch.manual_seed(1)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    image_embeds, image_feat = model.encode_image(px)
    _, text_feat = model.encode_text(ids, mask)
    pos = batch["image_ids"][:, None] == batch["image_ids"][None, :]
    sim_i2t = (image_feat @ text_feat.t()).float() / model.temp
    sim_t2i = (text_feat @ image_feat.t()).float() / model.temp
    itc = itc_loss(sim_i2t, sim_t2i, pos)
    itm = itm_loss(model, image_embeds, ids, mask, sim_i2t.detach(), sim_t2i.detach(), pos)
    lm = lm_loss(model, image_embeds, ids, mask)

    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert torch.equal(out["loss_itc"], itc)
    assert torch.equal(out["loss_itm"], itm)
    assert torch.equal(out["loss_lm"], lm)
    assert torch.equal(out["loss"], 0.5 * itc + 2.0 * itm + 0.25 * lm)
    assert not torch.allclose(out["loss"], itc + itm + lm)


def test_lm_loss_equals_the_decoders_own_loss(model, batch):
    """The LM objective is the cross-entropy transformers' decoder computes from labels."""
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_embeds, _ = model.encode_image(batch["pixel_values"])
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.dec_token_id
    own = model.text_decoder(
        input_ids=dec_ids,
        attention_mask=mask,
        encoder_hidden_states=image_embeds,
        labels=dec_ids.masked_fill(mask == 0, -100),
    ).loss
    assert torch.equal(lm_loss(model, image_embeds, ids, mask), own)


def test_zero_weight_switches_an_objective_off(model, batch):
    out = VLPObjective(model, ITC_ONLY, local_loss=True)(**batch)
    assert set(out) == {"loss", "loss_itc"}
    out["loss"].backward()
    assert model.itm_head.weight.grad is None
    assert all(p.grad is None for p in model.text_decoder.parameters())
    model.zero_grad(set_to_none=True)

    out = VLPObjective(model, ObjectiveWeights(itc=0.0, itm=0.0, lm=2.0), local_loss=True)(**batch)
    assert set(out) == {"loss", "loss_lm"}
    assert torch.allclose(out["loss"], 2 * out["loss_lm"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.temp.grad is None

    out = VLPObjective(model, ObjectiveWeights(itc=0.0, itm=1.0, lm=0.0), local_loss=True)(**batch)
    assert set(out) == {"loss", "loss_itm"}


def test_weights_name_every_objective_and_one_must_be_on():
    with pytest.raises(ConfigError, match="itc=0.0, itm=0.0, lm=0.0"):
        ObjectiveWeights(itc=0.0, itm=0.0, lm=0.0)
    with pytest.raises(TypeError):
        ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0, mlm=1.0)  # no unknown objective
    with pytest.raises(TypeError):
        ObjectiveWeights(itc=1.0)  # no implicit weight either


def test_itc_treats_same_image_captions_as_positives(model, batch):
    """Pairs 0 and 1 share an image: each row's target spreads evenly over both."""
    model.eval()
    with torch.no_grad():
        got = VLPObjective(model, ITC_ONLY, local_loss=True)(**batch)["loss_itc"]
        _, img = model.encode_image(batch["pixel_values"])
        _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    sim = img @ txt.t() / model.temp
    targets = torch.eye(6)
    targets[:2, :2] = 0.5
    expected = (
        torch.nn.functional.cross_entropy(sim, targets)
        + torch.nn.functional.cross_entropy(sim.t(), targets)
    ) / 2
    assert torch.allclose(got, expected, atol=1e-5)


def test_hard_negatives_never_share_the_image():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    pos = ids[:, None] == ids[None, :]
    sim = torch.randn(6, 6) * 50  # sharp: most softmax mass on a single column
    for _ in range(20):
        idx, ok = sample_hard_negatives(sim, pos)
        assert ok.all()
        assert not pos[torch.arange(6), idx].any()
    idx, ok = sample_hard_negatives(sim[:, :2], pos[:, :2])  # rows 0,1 have no negative
    assert ok.tolist() == [False, False, True, True, True, True]


def test_temperature_is_clamped(model, batch):
    with torch.no_grad():
        model.temp.fill_(5.0)
    VLPObjective(model, ALL, local_loss=True)(**batch)
    assert model.temp.item() == pytest.approx(0.5)
