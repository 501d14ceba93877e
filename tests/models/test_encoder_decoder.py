"""The encoder-decoder family: a VisionEncoderDecoderModel (ViT + GPT-2) as vlp loads and trains it.

A local checkpoint loads with transformers' own outputs (logits, greedy and beam captions),
its GPT-2 tokenizer's ids unchanged (no padding token added); it survives a vlp model
directory round trip; from params it trains, and its captions can be finetuned.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints.encoder_decoder import (
    IMAGE_SIZE,
    write_tiny_gpt2,
    write_tiny_vit,
    write_tiny_vit_gpt2,
)
from vlp.errors import ConfigError
from vlp.models.encoder_decoder import ImageCaptioner
from vlp.models.family import build_from_params, fresh_model, load_model, model_family
from vlp.models.objectives import ObjectiveWeights
from vlp.models.seq2seq_text import DecoderTokens


@pytest.fixture(scope="module")
def vit_gpt2(tmp_path_factory) -> Path:
    return write_tiny_vit_gpt2(tmp_path_factory.mktemp("ved") / "vit-gpt2")


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _reference(path: Path):
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    return (
        VisionEncoderDecoderModel.from_pretrained(str(path)).eval(),
        AutoTokenizer.from_pretrained(str(path)),
    )


def _assert_same_as_transformers(model: ImageCaptioner, ref, ref_tok) -> None:
    pixels = _pixels()
    ids = torch.tensor([[ref.config.decoder_start_token_id, 5, 9, 17, 30]] * 3)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, decoder_input_ids=ids).logits
        got = model.eval().decoder_logits(pixels, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for beams in (1, 3):
        out = ref.generate(pixels, num_beams=beams, max_new_tokens=8, do_sample=False)
        want = [t.strip() for t in ref_tok.batch_decode(out, skip_special_tokens=True)]
        assert model.generate_captions(pixels, num_beams=beams, max_length=8) == want
        assert any(want), "the reference captions are all empty: the check would be vacuous"


def test_a_vit_gpt2_checkpoint_captions_as_transformers_does(vit_gpt2, tmp_path):
    ref, ref_tok = _reference(vit_gpt2)
    assert model_family(vit_gpt2) == "encoder-decoder"
    loaded = load_model(vit_gpt2)
    assert loaded.format == "vision-encoder-decoder" and not loaded.has_itm
    model = loaded.model
    _assert_same_as_transformers(model, ref, ref_tok)
    # GPT-2 has no padding token: it pads with <|endoftext|>, and no id changes
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    assert len(model.tokenizer) == len(ref_tok)
    assert (
        model.tokenize(["a red circle"])["input_ids"][0].tolist()
        == ref_tok("a red circle")["input_ids"]
    )
    # the checkpoint's image processor, not vlp's transform
    assert loaded.transform.size == IMAGE_SIZE and loaded.transform.processor.image_mean[0] == 0.4

    # a vlp model directory keeps weights, generation settings and tokenizer
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert again.format == "vlp" and again.family.name == "encoder-decoder"
    _assert_same_as_transformers(again.model, ref, ref_tok)
    assert again.model.ved.generation_config.no_repeat_ngram_size == 3


def test_targets_end_every_text_on_the_end_token_whatever_the_tokenizer_adds(vit_gpt2, tokenizer):
    gpt2 = load_model(vit_gpt2).model
    eot = gpt2.tokenizer.eos_token_id
    enc = gpt2.tokenize(["a red circle", "a"])
    targets = gpt2.tokens.targets(enc["input_ids"], enc["attention_mask"])
    n = int(enc["attention_mask"][0].sum())
    assert targets[0, :n].tolist() == enc["input_ids"][0, :n].tolist()
    assert targets[0, n] == eot and targets[1, 1] == eot and (targets[1, 2:] == -100).all()
    # vlp's WordPiece wraps texts in [CLS] ... [SEP]: [CLS] starts, [SEP] is the last target
    tokens = DecoderTokens.choose(tokenizer)
    assert (tokens.start, tokens.end) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    enc = tokenizer(["a red circle", "a"], padding="longest", return_tensors="pt")
    targets = tokens.targets(enc["input_ids"], enc["attention_mask"])
    assert targets[0].tolist() == enc["input_ids"][0, 1:].tolist()
    assert targets[1].tolist()[:2] == [enc["input_ids"][1, 1], tokenizer.sep_token_id]


def _train(objective, batch, steps: int = 30) -> list[float]:
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        out = objective(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    return losses


def test_a_model_from_params_trains_saves_and_restarts_fresh(tiny_cfg, tokenizer, tmp_path):
    from vlp.models.family import FAMILIES

    cfg = tiny_cfg(family="encoder-decoder", image_tower="vit")
    torch.manual_seed(0)
    model = build_from_params(cfg, tokenizer, temperature=0.07)
    assert model.ved.config.decoder.add_cross_attention
    assert model.ved.config.decoder_start_token_id == tokenizer.cls_token_id
    objective = (
        FAMILIES["encoder-decoder"]
        .impl()
        .objective(model, ObjectiveWeights(itc=1.0, itm=1.0, lm=1.0), True)
    )
    enc = model.tokenize(["a red circle left of a blue square", "a big blue square"])
    batch = {"pixel_values": _pixels(2), **enc, "image_ids": torch.tensor([1, 2])}
    losses = _train(objective, batch)
    assert set(objective(**batch)) == {"loss", "loss_lm"}
    assert losses[-1] < 0.5 * losses[0]
    cross = [n for n, _ in model.named_parameters() if "crossattention" in n]
    assert cross and all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if n in cross
    )
    # it learned the first caption of image 0
    model.eval()
    assert model.generate_captions(_pixels(2)[:1], num_beams=2, max_length=12) == [
        "a red circle left of a blue square"
    ]
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m").model
    torch.testing.assert_close(
        again.decoder_logits(_pixels(2), enc["input_ids"]),
        model.decoder_logits(_pixels(2), enc["input_ids"]),
    )
    torch.manual_seed(1)
    scratch = fresh_model(tmp_path / "m", temperature=0.07)
    assert scratch.ved.config.to_dict() == model.ved.config.to_dict()
    assert not torch.equal(
        scratch.ved.decoder.transformer.wte.weight, model.ved.decoder.transformer.wte.weight
    )


def test_towers_from_a_vit_and_a_gpt2_checkpoint(tiny_cfg, tmp_path):
    from transformers import GPT2LMHeadModel, ViTModel

    from vlp.models.seq2seq_text import load_text_tokenizer

    vit = write_tiny_vit(tmp_path / "vit")
    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")
    cfg = tiny_cfg(
        family="encoder-decoder",
        image_tower="vit",
        image_pretrained=str(vit),
        text_pretrained=str(gpt2),
    )
    tok = load_text_tokenizer(gpt2, "model.text_pretrained")
    model = build_from_params(cfg, tok, temperature=0.07)
    src = GPT2LMHeadModel.from_pretrained(str(gpt2)).state_dict()
    got = model.ved.decoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.items())
    vit_weights = ViTModel.from_pretrained(str(vit), add_pooling_layer=False).state_dict()
    encoder = model.ved.encoder.state_dict()
    assert vit_weights.keys() == encoder.keys()
    assert all(torch.equal(encoder[k], v) for k, v in vit_weights.items())
    eot = tok.eos_token_id
    assert (model.tokens.start, model.tokens.end, model.tokens.pad) == (eot, eot, eot)
    assert not model.tokens.adds_start and not model.tokens.adds_end
    loss = model.caption_loss(_pixels(2), **model.tokenize(["a red circle", "a star"]))
    assert torch.isfinite(loss)


def test_a_cnn_tower_is_a_config_error(tiny_cfg, tokenizer):
    with pytest.raises(ConfigError, match="model.image_tower: 'cnn'.*vision transformer"):
        build_from_params(tiny_cfg(family="encoder-decoder", image_tower="cnn"), tokenizer, 0.07)


def test_it_learns_to_write_answers_after_the_question(vit_gpt2, tiny_cfg, tokenizer):
    from vlp.tasks.vqa.generative import AnswerObjective

    questions = ["what colour is the circle?", "how many shapes?"]
    answers = ["red", "two"]
    for model in (
        load_model(vit_gpt2).model,  # GPT-2's tokenizer: nothing added, <|endoftext|> closes
        build_from_params(tiny_cfg(family="encoder-decoder", image_tower="vit"), tokenizer, 0.07),
    ):
        q, a = model.tokenize(questions), model.tokenize(answers)
        batch = {
            "pixel_values": _pixels(2),
            **q,
            "answer_ids": a["input_ids"],
            "answer_mask": a["attention_mask"],
        }
        losses = _train(AnswerObjective(model), batch, steps=40)
        assert losses[-1] < 0.2 * losses[0]
        model.eval()
        got = model.generate_answers(_pixels(2), q["input_ids"], q["attention_mask"], 4)
        assert got == answers
        # one at a time (one prompt length per call) gives the same answers
        single = model.tokenize(questions[1:])
        assert (
            model.generate_answers(_pixels(2)[1:], single["input_ids"], single["attention_mask"], 4)
            == answers[1:]
        )
