"""Pretrained towers: BERT loads exactly, image_tower must match its checkpoint, CLIP's vision tower."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.models.vlp_model import VLPModel, build_model

ALL = ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0)
WORDS = "a red circle left of blue square two green triangles above small yellow star big".split()


def save_bert(path, with_lm_head: bool = False):
    """A tiny random BERT and a WordPiece BertTokenizer (vocab.txt) saved in `path`; its BertModel.

    `with_lm_head` saves a BertForMaskedLM, whose weights carry the `bert.` prefix as the
    published BERT checkpoints' do.
    """
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    saved = BertForMaskedLM(config) if with_lm_head else BertModel(config, add_pooling_layer=False)
    bert = saved.bert if with_lm_head else saved
    with torch.no_grad():  # token types large enough that dropping them could not pass
        bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
    saved.save_pretrained(str(path))
    return bert.eval()


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_bert_text_tower_equals_bert(with_lm_head, tiny_cfg, tmp_path):
    from vlp.models.tokenizer import build_tokenizer

    bert = save_bert(tmp_path / "bert", with_lm_head)
    cfg = tiny_cfg(text_pretrained=str(tmp_path / "bert"))
    tok = build_tokenizer(cfg)
    assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"])[0] == "[CLS]"
    m = build_model(cfg, tok, 0.07).eval()
    enc = m.tokenize(["a red circle left of a blue square", "a big star"])
    assert enc["attention_mask"].eq(0).any()  # padding in the batch
    with torch.no_grad():
        ours = m.encode_text(enc["input_ids"], enc["attention_mask"])[0]
        ref = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    torch.testing.assert_close(ours, ref.last_hidden_state, rtol=0, atol=1e-6)
    # the decoder starts from the same (folded) weights
    torch.testing.assert_close(
        m.text_decoder.bert.embeddings.position_embeddings.weight,
        m.text_encoder.embeddings.position_embeddings.weight,
    )


def save_vit(path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(str(path))
    return vit.eval()


def save_resnet(path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ).save_pretrained(str(path))


def save_convnext(path):
    from transformers import ConvNextConfig, ConvNextModel

    ConvNextModel(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    ).save_pretrained(str(path))


def clip_config(image_size: int = 32):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 8,
            "hidden_size": 20,
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )


def save_clip(path):
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(clip_config())
    clip.save_pretrained(str(path))
    return clip.eval()


def save_clip_vision(path):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    vision = CLIPVisionModel(clip_config().vision_config)
    vision.save_pretrained(str(path))
    return vision.eval()


SAVERS = {
    "cnn": save_resnet,
    "convnext": save_convnext,
    "vit": save_vit,
    "clip": save_clip,
    "clip_vision_model": save_clip_vision,
}
KIND = {"clip_vision_model": "clip"}


@pytest.mark.parametrize("saved", list(SAVERS))
def test_image_tower_must_match_its_checkpoint(saved, tiny_cfg, tokenizer, tmp_path):
    SAVERS[saved](tmp_path / saved)
    kind = KIND.get(saved, saved)
    model_type = {"cnn": "resnet"}.get(saved, saved)
    for tower in ("cnn", "convnext", "vit", "clip"):
        cfg = tiny_cfg(image_tower=tower, image_pretrained=str(tmp_path / saved))
        if tower == kind:
            m = build_model(cfg, tokenizer, 0.07)
            assert m.image_tower.model_type == {"clip": "clip_vision_model"}.get(
                model_type, model_type
            )
        else:
            with pytest.raises(
                ConfigError, match=f"model.image_tower: '{tower}'.*'{model_type}' model"
            ):
                build_model(cfg, tokenizer, 0.07)


def test_clip_tower_from_scratch(tiny_cfg, tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(image_tower="clip"), tokenizer, 0.07)
    backbone = m.image_tower.backbone
    assert type(backbone).__name__ == "CLIPVisionModel"
    assert (backbone.config.hidden_size, backbone.config.num_hidden_layers) == (32, 1)
    image_embeds, image_feat = m.encode_image(batch["pixel_values"])
    assert image_embeds.shape == (6, 1 + (32 // 8) ** 2, 32) and image_feat.shape == (6, 16)
    out = VLPObjective(m, ALL, local_loss=True)(**batch)
    out["loss"].backward()
    assert backbone.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    m.save_pretrained(tmp_path / "vlp")
    loaded = VLPModel.from_pretrained(tmp_path / "vlp")
    torch.testing.assert_close(loaded.encode_image(batch["pixel_values"])[0], image_embeds)


@pytest.mark.parametrize("saved", ["clip", "clip_vision_model"])
def test_clip_tower_from_checkpoint(saved, tiny_cfg, tokenizer, batch, tmp_path):
    src = SAVERS[saved](tmp_path / saved)
    reference = src.vision_model if saved == "clip" else src
    cfg = tiny_cfg(image_tower="clip", image_pretrained=str(tmp_path / saved))
    m = build_model(cfg, tokenizer, 0.07)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        ref = reference(pixel_values=pixels)
        tokens = m.image_tower.backbone_tokens(pixels)
    # the CLS token is CLIP's own pooled output; every token gets CLIP's final LayerNorm
    torch.testing.assert_close(tokens[:, 0], ref.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        tokens, reference.post_layernorm(ref.last_hidden_state), rtol=0, atol=1e-6
    )
    if saved == "clip":  # CLIP's own image features come from the same CLS token
        torch.testing.assert_close(
            src.visual_projection(tokens[:, 0]),
            src.get_image_features(pixel_values=pixels).pooler_output,
            rtol=0,
            atol=1e-6,
        )
    # other image sizes: CLIP's position embeddings are interpolated (48 px: 6x6 patches)
    big = torch.rand(2, 3, 48, 48)
    assert m.encode_image(big)[0].shape == (2, 1 + 36, 32)

    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    objective = VLPObjective(m, ALL, local_loss=True)
    before = m.image_tower.backbone.embeddings.patch_embedding.weight.clone()
    loss = objective(**batch)["loss"]
    loss.backward()
    opt.step()
    assert not torch.equal(before, m.image_tower.backbone.embeddings.patch_embedding.weight)

    m.save_pretrained(tmp_path / "vlp")
    for f in (tmp_path / saved).iterdir():  # reloads from the saved image_config alone
        f.unlink()
    loaded = VLPModel.from_pretrained(tmp_path / "vlp")
    assert loaded.image_tower.backbone.config.model_type == "clip_vision_model"
    torch.testing.assert_close(
        loaded.encode_image(pixels)[0], m.encode_image(pixels)[0], rtol=0, atol=0
    )


def test_vit_tower_tokens_are_vits_own(tiny_cfg, tokenizer, batch, tmp_path):
    vit = save_vit(tmp_path / "vit")
    m = build_model(
        tiny_cfg(image_tower="vit", image_pretrained=str(tmp_path / "vit")), tokenizer, 0.07
    )
    with torch.no_grad():
        tokens = m.image_tower.backbone_tokens(batch["pixel_values"])
        ref = vit(pixel_values=batch["pixel_values"]).last_hidden_state
    torch.testing.assert_close(tokens, ref, rtol=0, atol=1e-6)
