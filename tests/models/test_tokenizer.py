"""Tokenizer training, special tokens, save/load round trip, local-only loading."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.tokenizer import (
    DEC_TOKEN,
    ENC_TOKEN,
    build_tokenizer,
    ensure_special_tokens,
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


def test_trained_vocab_is_numbered_canonically_whatever_the_text_order(captions):
    import random

    texts = captions * 3
    shuffled = random.Random(0).sample(texts, len(texts))
    vocabs = [train_tokenizer(t, vocab_size=120).get_vocab() for t in (texts, shuffled, texts)]
    assert vocabs[1] == vocabs[0] and vocabs[2] == vocabs[0]
    by_id = sorted(vocabs[0], key=vocabs[0].get)
    assert by_id[:7] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC_TOKEN, ENC_TOKEN]
    assert by_id[7:] == sorted(by_id[7:])


TRAIN_AND_SAVE = """
import sys
from tests.models.conftest import CAPTIONS
from vlp.models.tokenizer import save_tokenizer, train_tokenizer
save_tokenizer(train_tokenizer(CAPTIONS * 3, int(sys.argv[2])), sys.argv[1])
"""


@pytest.mark.slow  # three Python processes
@pytest.mark.parametrize("vocab_size", [60, 400])  # cut off mid-training, and trained to the end
def test_trained_tokenizer_files_are_identical_across_processes(vocab_size, tmp_path):
    """The trainer's hash maps are seeded per process: only separate processes show it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN_AND_SAVE, str(tmp_path / f"tok{i}"), str(vocab_size)],
            cwd=root,
        )
        for i in range(3)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    files = [
        {f.name: f.read_bytes() for f in sorted((tmp_path / f"tok{i}").iterdir())} for i in range(3)
    ]
    assert "tokenizer.json" in files[0]
    assert files[1] == files[0] and files[2] == files[0]


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


CLIP_WORDS = (
    "a red circle left of blue square two green triangles above small yellow star big".split()
)


@pytest.fixture
def clip_tokenizer_dir(tmp_path):
    """A tiny byte-level BPE CLIPTokenizer (vocab.json + merges.txt) saved with save_pretrained."""
    import json

    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in CLIP_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer.from_pretrained(str(raw)).save_pretrained(str(tmp_path / "clip_tok"))
    return tmp_path / "clip_tok"


def test_clip_tokenizer_ends_on_its_own_stop_token(clip_tokenizer_dir, tmp_path):
    from vlp.data.torch_data import make_pretrain_collate

    tok = load_tokenizer(clip_tokenizer_dir)
    assert type(tok).__name__ == "CLIPTokenizer"
    # CLIP's own wrapping and ids are kept; cls/sep name them; [DEC]/[ENC] are added
    assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"]) == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "<|endoftext|>",
    ]
    assert (tok.cls_token, tok.sep_token) == ("<|startoftext|>", "<|endoftext|>")
    assert tok.pad_token_id == tok.sep_token_id  # CLIP pads with its stop token
    assert DEC_TOKEN in tok.get_vocab() and ENC_TOKEN in tok.get_vocab()

    captions = ["a red circle left of a blue square", "a big star"]
    items = [
        {"pixel_values": torch.zeros(3, 8, 8), "caption": c, "image_id": i}
        for i, c in enumerate(captions)
    ]
    batch = make_pretrain_collate(tok, max_length=16)(items)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[1].eq(0).any()  # the short caption is padded
    for row, m in zip(ids, mask, strict=True):
        n = int(m.sum())
        assert row[n - 1] == tok.sep_token_id and row[0] == tok.cls_token_id
    # LM targets (lm_loss: padding masked by the attention mask): one stop token per caption
    targets = ids.masked_fill(mask == 0, -100)[:, 1:]
    assert targets.eq(tok.sep_token_id).sum(dim=1).tolist() == [1, 1]

    save_tokenizer(tok, tmp_path / "again")  # the round trip tokenises identically
    again = load_tokenizer(tmp_path / "again")
    assert again(captions)["input_ids"] == tok(captions)["input_ids"]
    assert (again.sep_token_id, again.convert_tokens_to_ids(DEC_TOKEN), len(again)) == (
        tok.sep_token_id,
        tok.convert_tokens_to_ids(DEC_TOKEN),
        len(tok),
    )


def test_bert_style_tokenizers_are_unchanged(tokenizer, tmp_path):
    before = (len(tokenizer), tokenizer.special_tokens_map, tokenizer.get_vocab())
    assert ensure_special_tokens(tokenizer) is tokenizer
    assert (len(tokenizer), tokenizer.special_tokens_map, tokenizer.get_vocab()) == before
    assert (tokenizer.cls_token, tokenizer.sep_token) == ("[CLS]", "[SEP]")


def test_tokenizer_without_start_and_end_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    tok.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match=r"model.tokenizer_pretrained.*start and an end"):
        load_tokenizer(tmp_path / "plain")


def test_fusion_model_with_clip_tokenizer_stops_generating(clip_tokenizer_dir, tiny_cfg):
    """Trained on two captions, greedy decoding reproduces them and stops on CLIP's stop token."""
    from vlp.data.torch_data import make_pretrain_collate
    from vlp.models.objectives import ObjectiveWeights, VLPObjective
    from vlp.models.vlp_model import build_model

    tok = load_tokenizer(clip_tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), tok, 0.07)
    assert model.text_decoder.config.eos_token_id == tok.sep_token_id
    captions = ["a red circle left of a blue square", "two green triangles"]
    images = torch.stack([torch.full((3, 32, 32), v) for v in (-0.8, 0.8)])
    items = [
        {"pixel_values": images[i], "caption": c, "image_id": i} for i, c in enumerate(captions)
    ]
    batch = make_pretrain_collate(tok, max_length=16)(items)
    objective = VLPObjective(model, ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0), local_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        objective(**batch)["loss"].backward()
        opt.step()

    generated = []
    decode = tok.batch_decode
    tok.batch_decode = lambda ids, **kw: generated.append(ids) or decode(ids, **kw)
    max_length = 12
    texts = model.eval().generate_captions(images, num_beams=1, max_length=max_length)
    assert texts == captions
    (ids,) = generated
    assert ids.shape[1] < 1 + max_length  # every caption stopped before max_length
    for row, caption in zip(ids, captions, strict=True):
        n = len(tok(caption)["input_ids"])  # [DEC] + words + stop, as trained
        assert row[n - 1] == tok.sep_token_id and row[0] == model.dec_token_id
