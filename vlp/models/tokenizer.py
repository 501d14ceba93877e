"""WordPiece tokenizer trained on the corpus, or loaded from a local HF tokenizer directory.

Special tokens follow BERT ([PAD] [UNK] [CLS] [SEP] [MASK]) plus BLIP's two task tokens:
[DEC] starts every caption the decoder reads or writes, and [ENC] replaces [CLS] when the
text encoder runs as the image-grounded fusion encoder (ITM, VQA).

Whatever the tokenizer, `cls_token` is the token its post-processor puts first in every text
and `sep_token` the one it puts last: the caption decoder learns to end on `sep_token_id` and
generation stops on it. A foreign tokenizer keeps its own wrapping (CLIP's <|startoftext|>
... <|endoftext|>), and `ensure_special_tokens` names those two tokens cls and sep.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.errors import ConfigError
from vlp.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a lowercase BERT-style WordPiece tokenizer on `texts` (captions, questions, answers).

    The result is a function of `texts` and `vocab_size` alone, in every process: the special
    tokens keep ids 0-6 (`SPECIAL_TOKENS`' order) and every other token is numbered in
    string order. The trainer of `tokenizers` numbers the subwords it creates, and breaks
    ties between equally frequent merges, by the iteration order of hash maps seeded per
    process; registering every continuation subword (`##c`) before training fixes the ids
    that break those ties, so the set of learned subwords is fixed too.
    """
    from tokenizers import Tokenizer, models
    from tokenizers.trainers import WordPieceTrainer

    texts = list(texts)
    trainer_tok = _bert_tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + _continuation_subwords(trainer_tok, texts),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    learned = set(trainer_tok.get_vocab(with_added_tokens=True)) - set(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(learned))}
    tok: Tokenizer = _bert_tokenizer(
        models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def _bert_tokenizer(model: Any) -> Any:
    """A `tokenizers.Tokenizer` of `model` that lowercases and splits text as BERT does."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _continuation_subwords(tok: Any, texts: list[str]) -> list[str]:
    """`##c` for every character `c` that continues a word of `texts`, in string order."""
    chars: set[str] = set()
    for text in texts:
        normal = tok.normalizer.normalize_str(text)
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(normal):
            chars.update(word[1:])
    return sorted(f"##{c}" for c in chars)


def _wrap(tok: Any) -> PreTrainedTokenizerBase:
    """`tok` wrapping every text in [CLS] ... [SEP], as a transformers tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
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
    return ensure_special_tokens(tok, f"{key} ({p})")


def wrapping_tokens(tok: PreTrainedTokenizerBase, where: str = "tokenizer") -> tuple[str, str]:
    """The special tokens `tok` puts first and last in every tokenised text.

    vlp overwrites the first position with [ENC] / [DEC] and learns to stop on the last, so a
    tokenizer that adds no special token at either end (GPT-2, T5) is a ConfigError.
    """
    ids = tok("a")["input_ids"]
    special = set(tok.all_special_ids)
    if len(ids) < 2 or ids[0] not in special or ids[-1] not in special:
        raise ConfigError(
            f"{where}: the tokenizer must wrap every text in a start and an end special token "
            f"(BERT: [CLS] ... [SEP]; CLIP: <|startoftext|> ... <|endoftext|>); "
            f"it tokenises 'a' as {tok.convert_ids_to_tokens(ids)}"
        )
    first, last = tok.convert_ids_to_tokens([ids[0], ids[-1]])
    return first, last


def ensure_special_tokens(
    tok: PreTrainedTokenizerBase, where: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """Make `tok` usable by vlp (in place): cls/sep name its wrapping tokens; [DEC], [ENC] exist.

    Tokens the tokenizer already has keep their roles and ids: its bos/eos may be what its
    post-processor is rebuilt from on loading (CLIP), so [DEC] becomes the bos token only
    where there is none (BERT), else an extra special token. A tokenizer without a pad
    token gets [PAD], without a mask token [MASK].
    """
    first, last = wrapping_tokens(tok, where)
    add: dict = {}
    extra: list[str] = []
    if tok.pad_token is None:
        add["pad_token"] = "[PAD]"
    if tok.cls_token != first:
        add["cls_token"] = first
    if tok.sep_token != last:
        add["sep_token"] = last
    if tok.mask_token is None:
        add["mask_token"] = "[MASK]"
    if tok.bos_token is None:
        add["bos_token"] = DEC_TOKEN
    elif tok.bos_token != DEC_TOKEN and DEC_TOKEN not in tok.get_vocab():
        extra.append(DEC_TOKEN)
    if ENC_TOKEN not in tok.get_vocab():
        extra.append(ENC_TOKEN)
    if extra:
        add["additional_special_tokens"] = extra
    if add:
        tok.add_special_tokens(add, replace_extra_special_tokens=False)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save as a standard HF tokenizer directory, atomically."""
    with atomic_dir(Path(path), "tokenizer") as tmp:
        tok.save_pretrained(str(tmp))


def build_tokenizer(
    cfg: ModelConfig,
    texts: Iterable[str] | None = None,
    load: Callable[[Any, str], PreTrainedTokenizerBase] = load_tokenizer,
) -> PreTrainedTokenizerBase:
    """The tokenizer for `cfg`: `tokenizer_pretrained`, else the one beside `text_pretrained`,
    else a WordPiece tokenizer of `cfg.vocab_size` trained on `texts`.

    `load(path, key)` reads a tokenizer directory as the model family uses it (default: with
    vlp's [DEC] and [ENC] tokens, `load_tokenizer`).
    """
    if cfg.tokenizer_pretrained:
        return load(cfg.tokenizer_pretrained, "model.tokenizer_pretrained")
    if cfg.text_pretrained:
        p = local_dir(cfg.text_pretrained, "model.text_pretrained")
        if any((p / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            return load(p, "model.text_pretrained")
    if texts is None:
        raise ConfigError(
            "model.tokenizer_pretrained is not set and no texts were given to train a tokenizer"
        )
    return train_tokenizer(texts, cfg.vocab_size)
