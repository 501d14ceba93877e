"""The t5 family: image tokens prepended to the text in a T5 encoder-decoder.

From a local T5ForConditionalGeneration checkpoint the text-only path is transformers' T5
(logits to 1e-5, the same greedy and beam outputs) with its tokenizer's ids unchanged; from
params it trains on captions, saves, reloads and restarts fresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints.t5 import write_tiny_t5
from vlp.errors import ConfigError
from vlp.models.family import build_from_params, fresh_model, load_model, model_family
from vlp.models.objectives import ObjectiveWeights

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return write_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")


def _pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _assert_text_path_is_t5(model, path: Path) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    ref = T5ForConditionalGeneration.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    enc = tok(["what colour is the circle?", "a red star"], padding=True, return_tensors="pt")
    dec = torch.tensor([[ref.config.decoder_start_token_id, 5, 9, 12]] * 2)
    model.eval()
    with torch.no_grad():
        want = ref(**enc, decoder_input_ids=dec).logits
        got = model.text_logits(enc["input_ids"], enc["attention_mask"], dec)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ours = model.tokenize(["what colour is the circle?", "a red star"], max_length=64)
    assert torch.equal(ours["input_ids"], enc["input_ids"])
    for beams in (1, 3):
        out = ref.generate(**enc, num_beams=beams, max_new_tokens=6, do_sample=False)
        expected = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
        embeds, mask = model.joint_inputs(None, enc["input_ids"], enc["attention_mask"])
        assert model.generate_text(embeds, mask, beams, 6) == expected
        assert any(expected)


def test_a_t5_checkpoint_reads_text_as_transformers_t5(tiny_cfg, tiny_t5, tmp_path):
    assert model_family(tiny_t5) == "t5"
    cfg = tiny_cfg(family="t5", image_tower="vit", init_from=str(tiny_t5))
    torch.manual_seed(0)
    model = build_from_params(cfg, None, temperature=0.07)
    assert model.cfg.hidden_size == 32 and model.image_tower.out_dim == 32
    _assert_text_path_is_t5(model, tiny_t5)
    assert model.tokens.start == 0 and model.tokens.adds_end and not model.tokens.adds_start
    # images come before the text: the captions read them
    px = _pixels()
    assert model.generate_captions(px, 2, 6) is not None
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert again.family.name == "t5" and again.format == "vlp"
    _assert_text_path_is_t5(again.model, tiny_t5)
    dec = torch.tensor([[0, 5, 9]] * 2)
    torch.testing.assert_close(
        again.model.joint_logits(px, None, None, dec), model.joint_logits(px, None, None, dec)
    )


def test_a_t5_checkpoint_needs_model_params_for_its_image_tower(tiny_t5):
    with pytest.raises(ConfigError, match="T5 text model: its image tower"):
        load_model(tiny_t5)


def test_a_model_from_params_trains_saves_and_restarts_fresh(tiny_cfg, tokenizer, tmp_path):
    from vlp.models.family import FAMILIES

    cfg = tiny_cfg(family="t5", image_tower="vit")
    torch.manual_seed(0)
    model = build_from_params(cfg, tokenizer, temperature=0.07)
    assert model.t5.config.decoder_start_token_id == tokenizer.cls_token_id
    objective = (
        FAMILIES["t5"].impl().objective(model, ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0), True)
    )
    texts = ["a red circle left of a blue square", "a big blue square"]
    enc = model.tokenize(texts)
    batch = {"pixel_values": _pixels(), **enc, "image_ids": torch.tensor([1, 2])}
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = objective(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss_lm"]))
    assert losses[-1] < 0.2 * losses[0]
    assert model.image_tower.proj.weight.grad.abs().sum() > 0  # the image tokens are read
    model.eval()
    assert model.generate_captions(_pixels(), num_beams=2, max_length=12) == texts
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m").model
    assert again.generate_captions(_pixels(), num_beams=1, max_length=12) == texts
    torch.manual_seed(1)
    scratch = fresh_model(tmp_path / "m", temperature=0.07)
    assert scratch.t5.config.to_dict() == model.t5.config.to_dict()
    assert scratch.generate_captions(_pixels(), num_beams=1, max_length=12) != texts


def test_the_objective_refuses_a_zero_lm_weight(tiny_cfg, tokenizer):
    from vlp.models.family import FAMILIES

    model = build_from_params(tiny_cfg(family="t5", image_tower="cnn"), tokenizer, 0.07)
    with pytest.raises(ConfigError, match="t5 family trains the captioning LM alone"):
        FAMILIES["t5"].impl().objective(model, ObjectiveWeights(itc=1.0, itm=0.0, lm=0.0), True)


def test_a_tokenizer_without_an_end_token_is_a_config_error():
    from vlp.models.seq2seq_text import DecoderTokens

    class NoEnd:
        all_special_ids: list[int] = []
        eos_token_id = None
        bos_token_id = None
        pad_token_id = None

        def __call__(self, text):
            return {"input_ids": [7]}

    with pytest.raises(ConfigError, match="nor has an end token"):
        DecoderTokens.choose(NoEnd())


def test_it_learns_to_write_answers_to_questions(tiny_cfg, tiny_t5, tokenizer):
    from vlp.tasks.vqa.generative import AnswerObjective

    questions = ["what colour is the circle?", "how many shapes?"]
    answers = ["red", "two"]
    torch.manual_seed(0)
    for model in (
        build_from_params(tiny_cfg(family="t5", init_from=str(tiny_t5)), None, 0.07),
        build_from_params(tiny_cfg(family="t5"), tokenizer, 0.07),
    ):
        q, a = model.tokenize(questions), model.tokenize(answers)
        batch = {
            "pixel_values": _pixels(),
            **q,
            "answer_ids": a["input_ids"],
            "answer_mask": a["attention_mask"],
        }
        objective = AnswerObjective(model)
        opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
        for _ in range(80):
            loss = objective(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        assert model.generate_answers(_pixels(), q["input_ids"], q["attention_mask"], 4) == answers
