"""VQA task pieces: answer vocabulary, soft-score targets, the answer head, results JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlp.errors import ConfigError
from vlp.tasks.vqa.model import (
    AnswerHead,
    build_answer_vocab,
    make_vqa_collate,
    soft_targets,
)


def test_vocab_counts_normalised_answers_most_frequent_first() -> None:
    answers = [["two", "2", "2", "3"], ["yes", "Yes", "no"], ["a circle", "circle"]]
    vocab = build_answer_vocab(answers, max_answers=3)
    # "two" is "2" under the official normalisation; articles are dropped; ties alphabetical
    assert vocab == ["2", "circle", "yes"]
    assert build_answer_vocab(answers, max_answers=10) == ["2", "circle", "yes", "3", "no"]


def test_soft_targets_are_min_one_count_over_three() -> None:
    index = {"red": 0, "blue": 1, "green": 2}
    answers = [
        ["red"] * 8 + ["blue"] * 2,
        ["blue"] * 3 + ["green"] * 7,
        ["purple"] * 10,  # outside the vocabulary: an all-zero row
    ]
    t = soft_targets(answers, index)
    expected = torch.tensor([[1.0, 2 / 3, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(t, expected)


def test_collate_tokenises_questions_and_builds_targets(tiny_tokenizer) -> None:
    items = [
        {"pixel_values": torch.zeros(3, 8, 8), "question": "what color?", "answers": ["red"] * 10},
        {"pixel_values": torch.ones(3, 8, 8), "question": "is it?", "answers": ["no"] * 2},
    ]
    batch = make_vqa_collate(tiny_tokenizer, 16, ["red", "no"])(items)
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    torch.testing.assert_close(batch["targets"], torch.tensor([[1.0, 0.0], [0.0, 2 / 3]]))


def test_answer_head_reads_a_square_token_grid_and_gives_one_logit_per_answer() -> None:
    head = AnswerHead(hidden_size=16, num_answers=7, num_layers=2, num_heads=4)
    question, mask = torch.randn(4, 5, 16), torch.ones(4, 5, dtype=torch.long)
    for grid in (2, 3, 4):  # any image size: the position grid is resized
        assert head(torch.randn(4, 1 + grid * grid, 16), question, mask).shape == (4, 7)
    with pytest.raises(ConfigError, match="square grid; got 6 tokens"):
        head(torch.randn(4, 6, 16), question, mask)


def test_answer_head_ignores_question_padding() -> None:
    torch.manual_seed(0)
    head = AnswerHead(hidden_size=16, num_answers=3, num_heads=4).eval()
    image, question = torch.randn(1, 10, 16), torch.randn(1, 4, 16)
    padded = torch.cat([question, torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(
        head(image, question, torch.ones(1, 4, dtype=torch.long)), head(image, padded, mask)
    )


@pytest.mark.parametrize(
    ("layers", "heads", "message"),
    [(0, 4, "answer_layers: must be >= 1"), (2, 5, "answer_heads: 5 does not divide")],
)
def test_bad_answer_decoder_shape_is_a_config_error(layers: int, heads: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AnswerHead(hidden_size=16, num_answers=3, num_layers=layers, num_heads=heads)


def test_empty_vocab_is_a_config_error(tiny_vlp) -> None:
    from vlp.tasks.vqa.model import VQAModel

    with pytest.raises(ConfigError, match="vocabulary is empty"):
        VQAModel(tiny_vlp, [])


@pytest.mark.slow
def test_vqa_model_loss_falls_when_trained_on_one_batch(tiny_vlp) -> None:
    from vlp.models.objectives import VQAObjective
    from vlp.tasks.vqa.model import VQAModel

    torch.manual_seed(0)
    model = VQAModel(tiny_vlp, ["yes", "no", "2"])
    objective = VQAObjective(model)
    enc = tiny_vlp.tokenize(["is there a red circle?", "how many shapes are there?"])
    batch = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        **enc,
        "targets": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = objective(**batch)["loss"].item()
    for _ in range(15):
        opt.zero_grad()
        objective(**batch)["loss"].backward()
        opt.step()
    assert objective(**batch)["loss"].item() < first / 2
    assert model.predict(batch["pixel_values"], enc["input_ids"], enc["attention_mask"]) == [
        "yes",
        "2",
    ]


def test_answer_logits_depend_on_the_image(tiny_vlp) -> None:
    from vlp.tasks.vqa.model import VQAModel

    torch.manual_seed(0)
    model = VQAModel(tiny_vlp, ["yes", "no"]).eval()
    enc = tiny_vlp.tokenize(["is there a red circle?"] * 2)
    images = torch.stack([torch.full((3, 32, 32), -1.0), torch.full((3, 32, 32), 1.0)])
    logits = model.logits(images, enc["input_ids"], enc["attention_mask"])
    assert not torch.allclose(logits[0], logits[1])


def _batch(vlp) -> dict[str, torch.Tensor]:
    enc = vlp.tokenize(["is there a red circle?", "how many shapes are there?"])
    return {
        "pixel_values": torch.randn(2, 3, 32, 32),
        **enc,
        "targets": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    }


def test_frozen_encoders_stay_as_given_while_the_answer_decoder_learns(tiny_vlp) -> None:
    from vlp.models.objectives import VQAObjective
    from vlp.tasks.vqa.model import VQAModel

    torch.manual_seed(0)
    model = VQAModel(tiny_vlp, ["yes", "no", "2"], freeze_encoders=True).train()
    before = {k: v.clone() for k, v in tiny_vlp.state_dict().items()}  # BatchNorm stats too
    head_before = [p.detach().clone() for p in model.head.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        VQAObjective(model)(**_batch(tiny_vlp))["loss"].backward()
        opt.step()
    for key, value in tiny_vlp.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert any(
        not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters(), strict=True)
    )


def test_saved_answer_decoder_loads_with_its_architecture(tiny_vlp, tmp_path: Path) -> None:
    from vlp.tasks.vqa.model import VQAModel, architecture_from_info

    torch.manual_seed(0)
    model = VQAModel(tiny_vlp, ["yes", "no"], answer_layers=1, answer_heads=4).eval()
    model.save_head(tmp_path)
    arch = architecture_from_info(model.architecture(), tmp_path)
    assert arch == {"answer_layers": 1, "answer_heads": 4}
    loaded = VQAModel.load(tiny_vlp, ["yes", "no"], tmp_path, **arch).eval()
    batch = _batch(tiny_vlp)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(loaded.logits(*args), model.logits(*args))
    with pytest.raises(ConfigError, match="does not match the answer decoder"):
        VQAModel.load(tiny_vlp, ["yes", "no"], tmp_path, answer_layers=2, answer_heads=4)
    with pytest.raises(ConfigError, match="answer_heads must be an integer"):
        architecture_from_info({"answer_heads": "4"}, tmp_path)


def test_vqa_objective_trains_the_head_at_its_lr_multiplier(tiny_vlp) -> None:
    """The VQA loss is an objective over the model, the head's lr multiplier kept."""
    from vlp.models.objectives import VQAObjective
    from vlp.tasks.vqa.model import VQAModel
    from vlp.train.loop import param_groups

    torch.manual_seed(0)
    model = VQAModel(tiny_vlp, ["yes", "no", "2"], head_lr_multiplier=10.0)
    objective = VQAObjective(model)
    batch = _batch(tiny_vlp)
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, 3)
    want = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), batch["targets"], reduction="sum"
        )
        / 2
    )
    torch.testing.assert_close(objective(**batch)["loss"], want)
    head = {id(p) for p in model.head.parameters()}
    for group in param_groups(objective, 0.01, 1e-3):
        in_head = {id(p) in head for p in group["params"]}
        assert in_head == {group["lr"] == pytest.approx(1e-2)}
