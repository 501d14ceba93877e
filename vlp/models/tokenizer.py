"""WordPiece tokenizer trained on the corpus, or loaded from a local HF tokenizer directory.

Special tokens follow BERT ([PAD] [UNK] [CLS] [SEP] [MASK]) plus BLIP's two task tokens:
[DEC] starts every caption the decoder reads or writes (the `bos_token`), and [ENC] replaces
[CLS] when the text encoder runs as the image-grounded fusion encoder (ITM, VQA).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vlp.errors import ConfigError
from vlp.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a lowercase BERT-style WordPiece tokenizer on `texts` (captions, questions, answers)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token=DEC_TOKEN,
        additional_special_tokens=[ENC_TOKEN],
    )


def local_dir(path: str | os.PathLike, key: str) -> Path:
    """Return `path` if it is an existing local directory; anything else (a hub name) is a ConfigError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"{key}: {str(path)!r} is not a local directory "
            "(only local pretrained directories are loaded, never hub names)"
        )
    return p


def load_tokenizer(
    path: str | os.PathLike, key: str = "model.tokenizer_pretrained"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and make sure it has [DEC] and [ENC]."""
    from transformers import AutoTokenizer

    p = local_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {p}: {e}") from e
    return ensure_special_tokens(tok)


def ensure_special_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the BERT and BLIP special tokens a foreign tokenizer lacks (in place)."""
    add: dict = {}
    for attr, token in (
        ("pad_token", "[PAD]"),
        ("cls_token", "[CLS]"),
        ("sep_token", "[SEP]"),
        ("mask_token", "[MASK]"),
    ):
        if getattr(tok, attr) is None:
            add[attr] = token
    if tok.bos_token != DEC_TOKEN:
        add["bos_token"] = DEC_TOKEN
    if ENC_TOKEN not in tok.get_vocab():
        add["additional_special_tokens"] = [ENC_TOKEN]
    if add:
        tok.add_special_tokens(add)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save as a standard HF tokenizer directory, atomically."""
    with atomic_dir(Path(path), "tokenizer") as tmp:
        tok.save_pretrained(str(tmp))


def build_tokenizer(
    cfg: ModelConfig, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer for `cfg`: `tokenizer_pretrained`, else the one beside `text_pretrained`,
    else a WordPiece tokenizer of `cfg.vocab_size` trained on `texts`."""
    if cfg.tokenizer_pretrained:
        return load_tokenizer(cfg.tokenizer_pretrained)
    if cfg.text_pretrained:
        p = local_dir(cfg.text_pretrained, "model.text_pretrained")
        if any((p / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            return load_tokenizer(p, "model.text_pretrained")
    if texts is None:
        raise ConfigError(
            "model.tokenizer_pretrained is not set and no texts were given to train a tokenizer"
        )
    return train_tokenizer(texts, cfg.vocab_size)
