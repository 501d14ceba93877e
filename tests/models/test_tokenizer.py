"""Tokenizer training, special tokens, save/load round trip, local-only loading."""

from __future__ import annotations

import pytest

from vlp.errors import ConfigError
from vlp.models.tokenizer import (
    DEC_TOKEN,
    ENC_TOKEN,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


def test_trained_tokenizer_is_bert_style(tokenizer):
    enc = tokenizer("A Red Circle")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]  # lowercased, wrapped
    assert tokenizer.pad_token == "[PAD]" and tokenizer.bos_token == DEC_TOKEN
    assert tokenizer.convert_tokens_to_ids(ENC_TOKEN) != tokenizer.unk_token_id
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == "a red circle"


def test_vocab_size_is_respected(captions):
    tok = train_tokenizer(captions * 3, vocab_size=60)
    assert len(tok) <= 60


def test_save_load_round_trip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    texts = ["a small yellow star above a red circle", "unseen zebra words"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert len(loaded) == len(tokenizer)
    assert loaded.bos_token == DEC_TOKEN


def test_build_tokenizer_prefers_pretrained_dir(tokenizer, tiny_cfg, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    tok = build_tokenizer(tiny_cfg(tokenizer_pretrained=str(tmp_path / "tok")), texts=None)
    assert tok.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="no texts"):
        build_tokenizer(tiny_cfg(), texts=None)


def test_hub_name_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="model.tokenizer_pretrained.*not a local directory"):
        build_tokenizer(tiny_cfg(tokenizer_pretrained="bert-base-uncased"))
