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


CANDIDATES = ["red", "two", "a small triangle", "blue", "three", "circle", "left of the square"]


@torch.no_grad()
def _blip_rank_answer(hf, model, pixels, q, k: int) -> list[str]:
    """salesforce/BLIP's `rank_answer`, on transformers' BlipForQuestionAnswering parts."""
    from torch.nn import functional as F

    image_embeds = hf.vision_model(pixel_values=pixels).last_hidden_state
    states = hf.text_encoder(
        input_ids=_enc_first(model, q["input_ids"]),
        attention_mask=q["attention_mask"],
        encoder_hidden_states=image_embeds,
    ).last_hidden_state
    atts = q["attention_mask"]
    answers = model.tokenizer(CANDIDATES, padding="longest", return_tensors="pt")
    answer_ids, answer_atts = answers["input_ids"], answers["attention_mask"]
    answer_ids[:, 0] = hf.decoder_start_token_id
    n = states.shape[0]
    start_ids = answer_ids[0, 0].repeat(n, 1)
    logits = hf.text_decoder(
        start_ids, encoder_hidden_states=states, encoder_attention_mask=atts
    ).logits[:, 0, :]
    prob_first = F.softmax(logits, dim=1).index_select(dim=1, index=answer_ids[:, 1])
    _, topk_ids = prob_first.topk(k, dim=1)
    input_ids = torch.cat([answer_ids.index_select(0, t) for t in topk_ids])
    input_atts = torch.cat([answer_atts.index_select(0, t) for t in topk_ids])
    targets = input_ids.masked_fill(input_ids == model.tokenizer.pad_token_id, -100)
    out = hf.text_decoder(
        input_ids,
        attention_mask=input_atts,
        encoder_hidden_states=states.repeat_interleave(k, dim=0),
        encoder_attention_mask=atts.repeat_interleave(k, dim=0),
        labels=targets,
        reduction="none",
    )
    best = (-out.loss).view(n, k).argmax(dim=1)
    return [CANDIDATES[i] for i in topk_ids[torch.arange(n), best].tolist()]


@pytest.mark.parametrize("k", [2, len(CANDIDATES)])
def test_ranked_answers_equal_blips_rank_answer(vqa, k: int) -> None:
    from vlp.tasks.vqa.answer_ranking import rank_answers

    model, hf = vqa
    pixels, q = _pixels(), model.tokenize(QUESTIONS)
    ours = rank_answers(model, pixels, q["input_ids"], q["attention_mask"], CANDIDATES, k)
    assert ours == _blip_rank_answer(hf, model, pixels, q, k)
    assert set(ours) <= set(CANDIDATES)


def test_candidate_files_must_be_lists_of_answers(tmp_path: Path) -> None:
    from vlp.tasks.vqa.answer_ranking import read_candidates

    good = tmp_path / "answers.json"
    good.write_text('["yes", "no", "2"]')
    assert read_candidates(good) == ["yes", "no", "2"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"yes": 1}')
    with pytest.raises(ConfigError, match="--answers .*bad.json: must be a non-empty JSON list"):
        read_candidates(bad)
