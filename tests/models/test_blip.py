"""BLIP checkpoints of transformers load into VLPModel and compute what transformers computes.

Every comparison runs transformers' own class on the same checkpoint and the same inputs, in
fp32. transformers' BLIP forwards use the ids they are given; BLIP's callers put [ENC] first
for image-text matching and [DEC] first for captions, which is what vlp's `fuse` and
`decoder_logits` do to [CLS]: transformers gets the ids vlp actually feeds its text layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints.blip import IMAGE_SIZE, TEXT_WIDTH, VISION_WIDTH, make_blip_checkpoint
from vlp.errors import ConfigError
from vlp.models.blip import BLIP_CLASSES, load_blip
from vlp.models.vlp_model import VLPModel

TEXTS = ["a red circle left of a blue square", "two stars", "what colour is the big triangle ?"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blip")
    return {
        arch: make_blip_checkpoint(
            root / arch,
            arch,
            # its answer decoder cross-attends to text states with layers sized for images
            vision_width=TEXT_WIDTH if arch == "BlipForQuestionAnswering" else VISION_WIDTH,
        )
        for arch in BLIP_CLASSES
    }


def _load(path: Path, tiny_cfg, temperature: float = 0.07) -> VLPModel:
    torch.manual_seed(0)
    return load_blip(path, tiny_cfg(), temperature)


def _hf(arch: str, path: Path):
    import transformers

    return getattr(transformers, arch).from_pretrained(str(path), dtype=torch.float32).eval()


def _pixels(n: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


def _with_first(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    out = ids.clone()
    out[:, 0] = token_id
    return out


def test_itc_similarities_equal_blip_retrieval(checkpoints, tiny_cfg) -> None:
    path = checkpoints["BlipForImageTextRetrieval"]
    model, hf = _load(path, tiny_cfg), _hf("BlipForImageTextRetrieval", path)
    assert model.vision_proj.in_features == VISION_WIDTH != TEXT_WIDTH
    assert model.cfg.embed_dim == hf.config.image_text_hidden_size
    pixels, enc = _pixels(), model.tokenize(TEXTS)
    with torch.no_grad():
        ours = model.encode_image(pixels)[1] @ model.encode_text(**enc)[1].t()
        # one image per text: transformers returns all image x text similarities
        theirs = hf(pixel_values=pixels, use_itm_head=False, **enc).itm_score
    assert ours.shape == (3, 3)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_itm_logits_equal_blip_retrieval(checkpoints, tiny_cfg) -> None:
    path = checkpoints["BlipForImageTextRetrieval"]
    model, hf = _load(path, tiny_cfg), _hf("BlipForImageTextRetrieval", path)
    pixels, enc = _pixels(), model.tokenize(TEXTS)
    fused_ids = _with_first(enc["input_ids"], model.enc_token_id)
    with torch.no_grad():
        ours = model.itm_logits(model.encode_image(pixels)[0], **enc)
        theirs = hf(pixel_values=pixels, input_ids=fused_ids, attention_mask=enc["attention_mask"])
        with_cls = hf(pixel_values=pixels, **enc).itm_score
    torch.testing.assert_close(ours, theirs.itm_score, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, with_cls, atol=1e-3)  # the [ENC] in front matters


def test_caption_decoder_logits_equal_blip_captioning(checkpoints, tiny_cfg) -> None:
    path = checkpoints["BlipForConditionalGeneration"]
    model, hf = _load(path, tiny_cfg), _hf("BlipForConditionalGeneration", path)
    pixels, enc = _pixels(), model.tokenize(TEXTS)
    with torch.no_grad():
        ours = model.decoder_logits(model.encode_image(pixels)[0], **enc)
        theirs = hf(
            pixel_values=pixels,
            input_ids=_with_first(enc["input_ids"], model.dec_token_id),
            attention_mask=enc["attention_mask"],
        ).logits
    assert ours.shape[-1] == hf.config.text_config.vocab_size
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generated_captions_equal_blip_captioning(checkpoints, tiny_cfg, num_beams: int) -> None:
    path = checkpoints["BlipForConditionalGeneration"]
    model, hf = _load(path, tiny_cfg), _hf("BlipForConditionalGeneration", path)
    pixels = _pixels(4)
    ours = model.generate_captions(pixels, num_beams=num_beams, max_length=8)
    out = hf.generate(
        pixel_values=pixels,
        num_beams=num_beams,
        max_new_tokens=8,
        min_new_tokens=1,
        do_sample=False,
    )
    theirs = [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert ours == theirs
    assert any(len(c.split()) >= 3 for c in ours)  # real captions, not empty strings


def test_vqa_checkpoint_loads_encoder_and_answer_decoder(checkpoints, tiny_cfg) -> None:
    path = checkpoints["BlipForQuestionAnswering"]
    model, hf = _load(path, tiny_cfg), _hf("BlipForQuestionAnswering", path)
    pixels, enc = _pixels(), model.tokenize(["what colour is the circle ?"] * 3)
    with torch.no_grad():
        # BLIP's VQA: the answer decoder reads the fused question states, every one of them
        answers = model.generate_text(
            model.fuse(model.encode_image(pixels)[0], **enc), num_beams=1, max_length=6
        )
    out = hf.generate(
        input_ids=_with_first(enc["input_ids"], model.enc_token_id),
        pixel_values=pixels,
        attention_mask=enc["attention_mask"],
        max_new_tokens=6,
        min_new_tokens=1,
    )
    assert answers == [
        t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)
    ]
    assert any(answers)


def test_parts_a_class_lacks_start_as_vlp_starts_them(checkpoints, tiny_cfg) -> None:
    retrieval = _load(checkpoints["BlipForImageTextRetrieval"], tiny_cfg)
    captioning = _load(checkpoints["BlipForConditionalGeneration"], tiny_cfg)
    for model, src, dst in (
        (retrieval, retrieval.text_encoder, retrieval.text_decoder.bert),
        (captioning, captioning.text_decoder.bert, captioning.text_encoder),
    ):
        ref = src.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in dst.state_dict().items())
        assert model.text_decoder is not model.text_encoder
    hf = _hf("BlipForImageTextRetrieval", checkpoints["BlipForImageTextRetrieval"])
    assert torch.equal(retrieval.itm_head.weight, hf.itm_head.weight)
    assert not torch.equal(captioning.itm_head.weight, hf.itm_head.weight)  # fresh


def test_temperature_is_the_checkpoints_else_the_given_one(checkpoints, tiny_cfg, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = checkpoints["BlipForImageTextRetrieval"]
    assert _load(path, tiny_cfg, temperature=0.05).temp.item() == pytest.approx(0.05)
    copy = tmp_path / "with_temp"
    shutil.copytree(path, copy)
    weights = load_file(copy / "model.safetensors")
    save_file({**weights, "temp": torch.tensor(0.123)}, copy / "model.safetensors")
    assert _load(copy, tiny_cfg, temperature=0.05).temp.item() == pytest.approx(0.123)


@pytest.mark.parametrize("arch", BLIP_CLASSES)
def test_save_and_reload_without_the_checkpoint_keeps_outputs(
    checkpoints, tiny_cfg, tmp_path: Path, arch: str
) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoints[arch], src)
    model = _load(src, tiny_cfg)
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(src)
    again = VLPModel.from_pretrained(tmp_path / "model").eval()
    pixels, enc = _pixels(), model.tokenize(TEXTS)
    with torch.no_grad():
        for m in (model, again):
            img, img_feat = m.encode_image(pixels)
            m.outputs = (
                img_feat @ m.encode_text(**enc)[1].t(),
                m.itm_logits(img, **enc),
                m.decoder_logits(img, **enc),
            )
    for a, b in zip(model.outputs, again.outputs, strict=True):
        assert torch.equal(a, b)
    assert again.generate_captions(pixels, num_beams=1, max_length=20) == model.generate_captions(
        pixels, num_beams=1, max_length=20
    )
    assert again.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert again.temp.item() == model.temp.item()


def test_fresh_copy_has_the_architecture_and_tokenizer_not_the_weights(
    checkpoints, tiny_cfg, tmp_path: Path
) -> None:
    model = _load(checkpoints["BlipForImageTextRetrieval"], tiny_cfg)
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    fresh = VLPModel.from_pretrained(tmp_path / "model", fresh=True)
    ours, theirs = model.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert not torch.equal(ours["vision_proj.weight"], theirs["vision_proj.weight"])
    assert fresh.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    # trainable from scratch: not BLIP's 1e-10 vision initialisation
    assert theirs["image_tower.backbone.encoder.layers.0.mlp.fc1.weight"].std() > 1e-3


def test_a_tokenizer_without_dec_and_enc_gets_blips_ids(tiny_cfg, tmp_path: Path) -> None:
    path = make_blip_checkpoint(tmp_path / "hub", with_blip_tokens=False)
    model = _load(path, tiny_cfg)
    text = model.text_encoder.config
    assert model.dec_token_id == text.bos_token_id
    assert model.enc_token_id == text.bos_token_id + 1 == text.vocab_size - 1


def test_a_tokenizer_disagreeing_with_the_config_is_refused(tiny_cfg, tmp_path: Path) -> None:
    import json

    path = make_blip_checkpoint(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["bos_token_id"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.init_from: .*\[DEC\].*bos_token_id"):
        _load(path, tiny_cfg)


def test_what_is_not_a_blip_checkpoint_is_refused(checkpoints, tiny_cfg, tmp_path: Path) -> None:
    import json

    with pytest.raises(ConfigError, match="model.init_from: .*not a local directory"):
        _load(tmp_path / "missing", tiny_cfg)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model.init_from: .*no transformers BLIP model"):
        _load(tmp_path / "bert", tiny_cfg)
    blip_model = tmp_path / "blip_model"
    shutil.copytree(checkpoints["BlipForImageTextRetrieval"], blip_model)
    config = json.loads((blip_model / "config.json").read_text())
    (blip_model / "config.json").write_text(json.dumps({**config, "architectures": ["BlipModel"]}))
    with pytest.raises(ConfigError, match="model.init_from: .*BlipModel"):
        _load(blip_model, tiny_cfg)


def test_vqa_finetuning_reads_image_tokens_of_the_vision_width(checkpoints, tiny_cfg) -> None:
    from vlp.models.objectives import VQAObjective
    from vlp.tasks.vqa.model import VQAModel

    blip = _load(checkpoints["BlipForImageTextRetrieval"], tiny_cfg)
    vqa = VQAModel(blip, ["yes", "no", "2"], answer_heads=2)
    assert vqa.head.image_proj.in_features == VISION_WIDTH
    enc = blip.tokenize(["what colour is the circle ?", "how many stars ?"])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    loss = VQAObjective(vqa)(pixel_values=_pixels(2), targets=targets, **enc)["loss"]
    loss.backward()
    assert vqa.head.image_proj.weight.grad.abs().sum() > 0
