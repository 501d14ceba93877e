"""A BLIP checkpoint whose heads a use needs are untrained: `vlp zeroshot` refuses it and
pretraining's zero-shot check of it untrained is skipped, both with the same reason
(`vlp.models.family.untrained_for`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.checkpoints.blip import TEXT_WIDTH, make_blip_checkpoint
from vlp.config import Config
from vlp.errors import ConfigError
from vlp.inference import load_inference
from vlp.models.family import untrained_for
from vlp.pretrain_report import zero_shot_skipped


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blip")
    return {
        "retrieval": make_blip_checkpoint(root / "itr"),
        "captioning": make_blip_checkpoint(root / "cap", "BlipForConditionalGeneration"),
        "vqa": make_blip_checkpoint(
            root / "vqa", "BlipForQuestionAnswering", vision_width=TEXT_WIDTH
        ),
    }


def _with_init_from(cfg: Config, path: Path) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(path)))


def test_each_use_accepts_only_the_class_that_trained_what_it_needs(checkpoints) -> None:
    assert untrained_for(checkpoints["retrieval"], "retrieval") is None
    assert untrained_for(checkpoints["vqa"], "vqa") is None
    reason = untrained_for(checkpoints["captioning"], "retrieval", "--model")
    assert reason == (
        f"--model: {checkpoints['captioning']} holds a BlipForConditionalGeneration; only "
        "BlipForImageTextRetrieval has the trained ITC and ITM heads that encode and re-rank"
    )
    assert "only BlipForQuestionAnswering has the answer decoder" in untrained_for(
        checkpoints["retrieval"], "vqa"
    )
    with pytest.raises(ValueError, match="use 'captioning' is not one of retrieval, vqa"):
        untrained_for(checkpoints["retrieval"], "captioning")


@pytest.mark.parametrize("kind", ["captioning", "vqa"])
def test_zeroshot_refuses_and_pretraining_skips_with_the_same_reason(
    checkpoints, smoke_cfg: Config, kind: str
) -> None:
    path = checkpoints[kind]
    reason = untrained_for(path, "retrieval", "--model")
    with pytest.raises(ConfigError) as refused:
        load_inference(smoke_cfg, path, "fp32", None)
    assert str(refused.value) == reason

    cfg = _with_init_from(smoke_cfg, path)
    skipped = zero_shot_skipped(cfg, untrained=True)
    assert skipped == f"skipped: {untrained_for(path, 'retrieval', 'model.init_from')}"
    # trained by pretraining, its heads are no longer random: the check runs
    assert zero_shot_skipped(cfg, untrained=False) != skipped


def test_a_retrieval_checkpoint_is_checked_untrained(checkpoints, smoke_cfg: Config) -> None:
    cfg = _with_init_from(smoke_cfg, checkpoints["retrieval"])
    assert "holds a" not in (zero_shot_skipped(cfg, untrained=True) or "")
