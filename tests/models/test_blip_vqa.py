"""BLIP's generative VQA in VLPModel: answers and loss equal transformers'
`BlipForQuestionAnswering` on a tiny random checkpoint, given the ids BLIP feeds it ([ENC]
first: transformers takes the question ids as given, BLIP's `blip_vqa.py` puts [ENC] first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints.blip import IMAGE_SIZE, TEXT_WIDTH, make_blip_checkpoint
from vlp.errors import ConfigError
from vlp.models.blip import load_blip
from vlp.models.family import FAMILIES
from vlp.tasks.vqa.generative import AnswerObjective, writes_answers

QUESTIONS = [
    "what colour is the circle ?",
    "how many stars are there ?",
    "what shape is left of the big blue square ?",
]
ANSWERS = ["red", "two", "a small triangle"]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory: pytest.TempPathFactory):
    import transformers

    path = make_blip_checkpoint(
        tmp_path_factory.mktemp("blip") / "vqa", "BlipForQuestionAnswering", vision_width=TEXT_WIDTH
    )
    hf = transformers.BlipForQuestionAnswering.from_pretrained(str(path)).eval()
    torch.manual_seed(0)
    return load_blip(path, None, 0.07), hf


def _pixels(n: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


def _enc_first(model, ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[:, 0] = model.enc_token_id
    return out


def test_generated_answers_equal_blip_question_answering_generate(vqa) -> None:
    model, hf = vqa
    pixels, q = _pixels(), model.tokenize(QUESTIONS)
    ours = model.generate_answers(pixels, q["input_ids"], q["attention_mask"], max_length=6)
    out = hf.generate(
        input_ids=_enc_first(model, q["input_ids"]),
        attention_mask=q["attention_mask"],
        pixel_values=pixels,
        max_new_tokens=6,
        min_new_tokens=1,
    )
    theirs = [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert ours == theirs
    assert all(ours)  # written answers, not empty strings


def test_answer_loss_equals_blip_question_answering_loss(vqa) -> None:
    model, hf = vqa
    pixels, q, a = _pixels(), model.tokenize(QUESTIONS), model.tokenize(ANSWERS)
    ours = model.answer_loss(
        pixels, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"]
    )
    dec = _enc_first(model, a["input_ids"])
    dec[:, 0] = model.dec_token_id
    with torch.no_grad():
        theirs = hf(
            input_ids=_enc_first(model, q["input_ids"]),
            attention_mask=q["attention_mask"],
            pixel_values=pixels,
            decoder_input_ids=dec,
            decoder_attention_mask=a["attention_mask"],
            labels=dec.masked_fill(a["attention_mask"] == 0, -100),
        ).loss
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=0)


def test_training_to_write_answers_moves_the_answer_decoder(vqa) -> None:
    model, _ = vqa
    pixels, q, a = _pixels(), model.tokenize(QUESTIONS), model.tokenize(ANSWERS)
    objective = AnswerObjective(model.train())
    out = objective(
        pixels, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"]
    )
    out["loss"].backward()
    model.eval()
    decoder_grad = sum(
        p.grad.abs().sum() for p in model.text_decoder.parameters() if p.grad is not None
    )
    encoder_grad = model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum()
    assert decoder_grad > 0 and encoder_grad > 0
    model.zero_grad()


def test_a_decoder_reading_image_tokens_cannot_write_answers(tmp_path: Path) -> None:
    path = make_blip_checkpoint(tmp_path / "itr")  # vision width 24, text width 32
    model = load_blip(path, None, 0.07)
    q = model.tokenize(QUESTIONS)
    with pytest.raises(ConfigError, match="cross-attends to width 24"):
        model.generate_answers(_pixels(), q["input_ids"], q["attention_mask"], max_length=4)


def test_the_head_chooses_how_each_family_answers() -> None:
    fusion, clip, t5 = FAMILIES["fusion"], FAMILIES["clip"], FAMILIES["t5"]
    assert not writes_answers(fusion, "classifier")
    assert writes_answers(fusion, "generate")
    assert writes_answers(t5, "classifier") and writes_answers(t5, "generate")
    assert not writes_answers(clip, "classifier")
    with pytest.raises(ConfigError, match="finetune.vqa.head: generate, but model.family clip"):
        writes_answers(clip, "generate")
