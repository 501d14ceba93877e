"""A checkpoint reads texts up to its own length unless model.max_text_length sets one."""

from __future__ import annotations

import warnings

import pytest

from tests.checkpoints.clip import write_tiny_clip
from vlp.errors import ConfigError
from vlp.models.family import build_from_params, load_model

LONG = " ".join(["a red circle left of the blue square"] * 12)  # far over 40 tokens


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")  # 40 positions


def _tokens(model) -> int:
    return model.tokenize([LONG])["input_ids"].shape[1]


def test_null_length_is_the_checkpoints_own_and_survives_saving(clip_dir, tiny_cfg, tmp_path):
    cfg = tiny_cfg(family="clip", init_from=str(clip_dir), max_text_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint's own length: nothing to warn about
        model = build_from_params(cfg, None, 0.07)
    assert model.cfg.max_text_length == 40 and _tokens(model) == 40
    model.save_pretrained(tmp_path / "pretrained")  # as the pretrain stage saves it
    back = load_model(tmp_path / "pretrained").model
    assert back.cfg.max_text_length == 40 and _tokens(back) == 40


def test_a_smaller_length_in_params_wins_with_a_warning(clip_dir, tiny_cfg):
    cfg = tiny_cfg(family="clip", init_from=str(clip_dir), max_text_length=24)
    with pytest.warns(UserWarning, match=r"model.max_text_length: 24 cuts .* its own 40"):
        model = build_from_params(cfg, None, 0.07)
    assert model.cfg.max_text_length == 24 and _tokens(model) == 24


def test_a_larger_length_in_params_is_capped_silently(clip_dir, tiny_cfg):
    cfg = tiny_cfg(family="clip", init_from=str(clip_dir), max_text_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_from_params(cfg, None, 0.07)
    assert model.cfg.max_text_length == 40


def test_a_model_built_from_params_needs_a_length(tiny_cfg, tokenizer):
    with pytest.raises(ConfigError, match="model.max_text_length"):
        build_from_params(tiny_cfg(family="clip", max_text_length=None), tokenizer, 0.07)
