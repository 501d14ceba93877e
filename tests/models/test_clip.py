"""CLIPDualEncoder: equal to transformers' CLIPModel, saved and reloaded, loaded by family."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.checkpoints.clip import write_tiny_clip
from vlp.errors import ConfigError
from vlp.models.clip import CLIPDualEncoder, build_clip
from vlp.models.family import fresh_model, load_model, model_family
from vlp.models.objectives import CLIPObjective, clamp_logit_scale

TEXTS = ["a red circle left of a blue square", "the star", "what colour is it?"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _reference(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    return (
        CLIPModel.from_pretrained(str(clip_dir)).eval(),
        CLIPTokenizer.from_pretrained(str(clip_dir)),
    )


def test_features_equal_clipmodel(clip_dir):
    ref, tok = _reference(clip_dir)
    model = CLIPDualEncoder.from_checkpoint(clip_dir).eval()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_img = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        want_txt = F.normalize(ref.get_text_features(**enc).pooler_output, dim=-1)
        _, got_img = model.encode_image(pixels)
        ids = model.tokenize(TEXTS)
        _, got_txt = model.encode_text(ids["input_ids"], ids["attention_mask"])
    assert torch.equal(ids["input_ids"], enc["input_ids"])  # CLIP's tokenizer, unchanged
    assert got_img.shape == (2, 16) and got_txt.shape == (3, 16)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=0)
    # the pooled token is CLIP's end-of-text, which padding does not move
    with torch.no_grad():
        _, alone = model.encode_text(**model.tokenize(TEXTS[1:2]))
    torch.testing.assert_close(alone[0], got_txt[1], atol=1e-5, rtol=0)
    assert model.cfg.family == "clip" and model.cfg.embed_dim == 16
    assert model.temp.item() == pytest.approx(1 / ref.logit_scale.exp().item())


def test_save_and_reload_by_family(clip_dir, tmp_path):
    model = load_model(clip_dir).model.eval()  # a raw CLIPModel directory
    assert isinstance(model, CLIPDualEncoder)
    model.save_pretrained(tmp_path / "m", {"extra.json": {"k": 1}})
    assert model_family(tmp_path / "m") == "clip"
    assert not (tmp_path / "m" / "config.json").exists()  # no source needed to reload
    back = load_model(tmp_path / "m").model.eval()
    assert isinstance(back, CLIPDualEncoder) and back.cfg == model.cfg
    pixels = torch.randn(2, 3, 48, 48)  # another size: positions are interpolated
    with torch.no_grad():
        assert torch.equal(back.encode_image(pixels)[1], model.encode_image(pixels)[1])
        ids = model.tokenize(TEXTS)
        assert torch.equal(back.encode_text(**ids)[1], model.encode_text(**ids)[1])
    assert back.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    fresh = fresh_model(tmp_path / "m", temperature=0.07)
    assert fresh.clip.config.to_dict() == back.clip.config.to_dict()
    assert not torch.equal(fresh.clip.visual_projection.weight, back.clip.visual_projection.weight)
    assert fresh.temp.item() == pytest.approx(0.07)


def test_scratch_clip_from_params(tiny_cfg, tokenizer, batch):
    torch.manual_seed(0)
    model = build_clip(tiny_cfg(family="clip"), tokenizer, temperature=0.05)
    text = model.clip.config.text_config
    assert text.eos_token_id == tokenizer.sep_token_id  # pools vlp's closing [SEP]
    assert text.vocab_size == len(tokenizer) and text.max_position_embeddings == 16
    assert model.temp.item() == pytest.approx(0.05)
    _, img = model.encode_image(batch["pixel_values"])
    _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (6, 16)


def test_scratch_clip_refuses_single_towers(tiny_cfg, tokenizer):
    with pytest.raises(ConfigError, match="model.image_pretrained"):
        build_clip(tiny_cfg(family="clip", image_pretrained="/x"), tokenizer, 0.07)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a vlp model directory"):
        load_model(tmp_path)


def _clip(tiny_cfg, tokenizer, temperature=0.07):
    torch.manual_seed(0)
    return build_clip(tiny_cfg(family="clip"), tokenizer, temperature)


def test_clip_loss_is_itc_with_the_logit_scale(tiny_cfg, tokenizer, batch):
    model = _clip(tiny_cfg, tokenizer).eval()
    out = CLIPObjective(model, weight=2.0, local_loss=True)(**batch)
    assert set(out) == {"loss", "loss_itc"}
    _, img = model.encode_image(batch["pixel_values"])
    _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    logits = img @ txt.t() * model.clip.logit_scale.exp()
    # captions 0 and 1 share an image: both are positives of it, as vlp's ITC counts them
    pos = batch["image_ids"][:, None] == batch["image_ids"][None, :]
    target = pos.float() / pos.sum(1, keepdim=True)
    want = (
        -(logits.log_softmax(1) * target).sum(1).mean()
        - (logits.t().log_softmax(1) * target).sum(1).mean()
    ) / 2
    torch.testing.assert_close(out["loss_itc"], want)
    torch.testing.assert_close(out["loss"], 2 * want)
    with pytest.raises(ConfigError, match="contrastive loss alone"):
        CLIPObjective(model, weight=0.0, local_loss=True)


def test_training_steps_decrease_the_loss_and_learn_the_scale(tiny_cfg, tokenizer, batch):
    model = _clip(tiny_cfg, tokenizer)
    objective = CLIPObjective(model, 1.0, local_loss=True)
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    scale0 = model.logit_scale.item()
    losses = []
    for _ in range(15):
        loss = objective(**batch)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert model.logit_scale.item() != pytest.approx(scale0)


def test_logit_scale_is_clamped_at_100(tiny_cfg, tokenizer, batch):
    model = _clip(tiny_cfg, tokenizer, temperature=0.001)  # scale 1000 at the start
    assert model.logit_scale.exp().item() == pytest.approx(1000.0)
    CLIPObjective(model, 1.0, local_loss=True)(**batch)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    assert model.temp.item() == pytest.approx(0.01)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0


def test_scratch_clip_with_a_clip_tokenizer_pools_its_end_of_text(clip_dir, tiny_cfg):
    from vlp.models.clip import load_clip_tokenizer

    tok = load_clip_tokenizer(clip_dir, "model.tokenizer_pretrained")
    torch.manual_seed(0)
    model = build_clip(tiny_cfg(family="clip"), tok, 0.07)
    text = model.clip.config.text_config
    assert (text.bos_token_id, text.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    _, feats = model.encode_text(**model.tokenize(TEXTS))
    _, alone = model.encode_text(**model.tokenize(TEXTS[1:2]))
    torch.testing.assert_close(alone[0], feats[1], atol=1e-5, rtol=0)
    # pooled after the words (a causal tower's first token would be the same for every text)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)
