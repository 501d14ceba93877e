"""VLPModel: shapes of every method, save/load, decoding, local pretrained towers."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.objectives import ObjectiveWeights, VLPObjective, lm_loss
from vlp.models.vlp_model import VLPModel, build_model
from vlp.models.weights import CONFIG_NAME

IMAGE = 32  # the `batch` fixture's image size
ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)


@pytest.mark.parametrize("tower", ["cnn", "convnext", "vit"])
def test_shapes_of_every_method(tower, tiny_cfg, tokenizer, batch):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(image_tower=tower), tokenizer, 0.07)
    b, t = batch["input_ids"].shape
    image_embeds, image_feat = m.encode_image(batch["pixel_values"])
    n = image_embeds.shape[1]
    # global token + feature-map cells (CNNs downsample 16x) or 8x8-pixel patches (ViT)
    assert n == 1 + (IMAGE // (8 if tower == "vit" else 16)) ** 2
    assert image_embeds.shape == (b, n, 32) and image_feat.shape == (b, 16)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(b), atol=1e-5)
    text_embeds, text_feat = m.encode_text(batch["input_ids"], batch["attention_mask"])
    assert text_embeds.shape == (b, t, 32) and text_feat.shape == (b, 16)
    assert torch.allclose(text_feat.norm(dim=-1), torch.ones(b), atol=1e-5)
    fused = m.fuse(image_embeds, batch["input_ids"], batch["attention_mask"])
    assert fused.shape == (b, t, 32)
    assert m.itm_logits(image_embeds, batch["input_ids"], batch["attention_mask"]).shape == (b, 2)
    logits = m.decoder_logits(image_embeds, batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (b, t, len(tokenizer))
    out = VLPObjective(m, ALL, local_loss=True)(**batch)
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())


def test_itm_scores_k_candidates_in_one_call(model, batch):
    """Re-ranking: one image against every caption by repeating its image tokens."""
    model.eval()
    image_embeds, _ = model.encode_image(batch["pixel_values"][:1])
    k = batch["input_ids"].shape[0]
    logits = model.itm_logits(
        image_embeds.expand(k, -1, -1), batch["input_ids"], batch["attention_mask"]
    )
    one = model.itm_logits(image_embeds, batch["input_ids"][2:3], batch["attention_mask"][2:3])
    assert logits.shape == (k, 2)
    assert torch.allclose(logits[2], one[0], atol=1e-5)


def test_text_encoder_ignores_padding_and_image(model, tokenizer, batch):
    model.eval()
    alone = model.tokenize(["a big blue square"])
    _, feat_alone = model.encode_text(**alone)
    _, feat_batch = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(feat_alone[0], feat_batch[2], atol=1e-5)  # caption 2, padded in batch
    image_embeds, _ = model.encode_image(batch["pixel_values"])
    f1 = model.fuse(image_embeds[2:3], **alone)
    f2 = model.fuse(image_embeds[3:4], **alone)
    assert not torch.allclose(f1, f2)  # the fusion encoder does look at the image


def test_generate_returns_strings(model, batch):
    model.eval()
    beams = model.generate_captions(batch["pixel_values"][:3], num_beams=3, max_length=6)
    greedy = model.generate_captions(batch["pixel_values"][:3], num_beams=1, max_length=6)
    assert len(beams) == len(greedy) == 3
    assert all(isinstance(c, str) and c for c in beams + greedy)
    assert all(len(c.split()) <= 6 for c in beams + greedy)  # a word takes >= 1 token
    with pytest.raises(ConfigError, match="max_length"):
        model.generate_captions(batch["pixel_values"][:1], num_beams=1, max_length=10_000)


def test_greedy_generate_matches_argmax_decoding(model, batch):
    """`generate` (with its KV cache) agrees with re-running the decoder token by token."""
    model.eval()
    image_embeds, _ = model.encode_image(batch["pixel_values"][:2])
    ids = torch.full((2, 1), model.dec_token_id)
    with torch.no_grad():
        for _ in range(5):
            logits = model.text_decoder(input_ids=ids, encoder_hidden_states=image_embeds).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = [s.strip() for s in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    got = model.generate_text(image_embeds, num_beams=1, max_length=5)
    # generation may stop early at [SEP]; then it is a prefix of the argmax run
    assert all(e.startswith(g) for e, g in zip(expected, got, strict=True))


def test_save_load_round_trip(model, batch, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        ".vlp-output",
        "model.safetensors",
        "tokenizer",
        "vlp_config.json",
    ]
    loaded = VLPModel.from_pretrained(tmp_path / "m").eval()
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for a, b in zip(model.encode_image(px), loaded.encode_image(px), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(model.encode_text(ids, mask)[1], loaded.encode_text(ids, mask)[1])
        emb = model.encode_image(px)[0]
        assert torch.equal(model.itm_logits(emb, ids, mask), loaded.itm_logits(emb, ids, mask))
        assert torch.equal(lm_loss(model, emb, ids, mask), lm_loss(loaded, emb, ids, mask))
    assert model.generate_captions(px, 2, 6) == loaded.generate_captions(px, 2, 6)
    # tied LM head stays tied after loading
    dec = loaded.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_no_loss_weights_on_the_model_or_in_its_config(model, batch, tmp_path):
    """What a model is trained with belongs to the stage, not to the model or its files."""
    import json

    VLPObjective(model, ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0), local_loss=True)(
        **batch
    )  # leaves no trace
    assert not any("weight" in name for name in vars(model) if not name.startswith("_"))
    assert not hasattr(model, "loss_weights")
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert not any("loss" in key or "weight" in key for key in saved)

    # a model directory written before carries the key: it still loads, and it is ignored
    saved["loss_weights"] = {"itc": 0.0, "itm": 0.0, "lm": 1.0}
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(saved))
    loaded = VLPModel.from_pretrained(tmp_path / "m").eval()
    assert not hasattr(loaded, "loss_weights")
    px = batch["pixel_values"]
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(px)[1], model.eval().encode_image(px)[1])


def test_saved_model_dir_is_readable_by_others_under_umask_022(model, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    paths = [tmp_path / "m", *(tmp_path / "m").rglob("*")]
    assert len(paths) > 4  # the tokenizer files too
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {k: 0o755 if (tmp_path / k).is_dir() else 0o644 for k in modes}


def test_from_pretrained_rejects_missing_or_foreign_dirs(tmp_path):
    with pytest.raises(ConfigError, match="not a local directory"):
        VLPModel.from_pretrained("Salesforce/blip-itm-base-coco")
    with pytest.raises(ConfigError, match="not a saved VLP model"):
        VLPModel.from_pretrained(tmp_path)


def test_towers_load_from_local_pretrained_dirs(tiny_cfg, tokenizer, batch, tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer) - 2,  # the model resizes to the tokenizer's vocabulary
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    cfg = tiny_cfg(
        image_tower="vit",
        image_pretrained=str(tmp_path / "vit"),
        text_pretrained=str(tmp_path / "bert"),
    )
    m = build_model(cfg, tokenizer, 0.07)

    bert_sd, enc_sd = bert.state_dict(), m.text_encoder.state_dict()
    dec_sd = m.text_decoder.bert.state_dict()
    for key in (
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.weight",
    ):
        assert torch.equal(enc_sd[key], bert_sd[key]) and torch.equal(dec_sd[key], bert_sd[key])
    word = "embeddings.word_embeddings.weight"
    assert torch.equal(enc_sd[word][: len(tokenizer) - 2], bert_sd[word])
    vit_sd = vit.state_dict()
    tower_sd = m.image_tower.backbone.state_dict()
    assert all(torch.equal(tower_sd[k], v) for k, v in vit_sd.items() if k in tower_sd)
    out = VLPObjective(m, ALL, local_loss=True)(**batch)
    assert all(torch.isfinite(v) for v in out.values())
    assert m.encode_image(batch["pixel_values"])[0].shape[-1] == 24  # projected to text width

    m.save_pretrained(tmp_path / "vlp")  # reloads without the source dirs
    (tmp_path / "vit" / "config.json").unlink()
    loaded = VLPModel.from_pretrained(tmp_path / "vlp")
    assert torch.equal(
        loaded.encode_image(batch["pixel_values"])[1], m.encode_image(batch["pixel_values"])[1]
    )


@pytest.mark.parametrize(
    "key,value",
    [("image_pretrained", "google/vit-base-patch16-224"), ("text_pretrained", "bert-base-uncased")],
)
def test_hub_names_are_rejected(tiny_cfg, tokenizer, key, value):
    with pytest.raises(ConfigError, match=f"model.{key}.*not a local directory"):
        build_model(tiny_cfg(**{key: value}), tokenizer, 0.07)


def test_unknown_tower_is_a_config_error(tiny_cfg, tokenizer):
    with pytest.raises(ConfigError, match="model.image_tower"):
        build_model(tiny_cfg(image_tower="resnet9000"), tokenizer, 0.07)
