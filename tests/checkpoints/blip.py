"""Tiny random transformers BLIP checkpoints, saved as `save_pretrained` writes them.

Vision and text widths differ (24 vs 32) so that a model mixing them up fails; BLIP's VQA
decoder cross-attends to the question states with the layers sized for image tokens, so a
VQA checkpoint needs `vision_width=TEXT_WIDTH` (as BLIP's own have). The tokenizer
is a BertTokenizer over a small word list with BLIP's [DEC] (bos) and [ENC] appended, saved
with a BlipProcessor (its image processor beside the weights), as BLIP's directories are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the red green blue yellow circle square triangle star left right of above below "
    "small big two three is what colour there how many shape ? , ."
).split()
IMAGE_SIZE = 32
VISION_WIDTH = 24
TEXT_WIDTH = 32


def words_of(texts: Iterable[str]) -> list[str]:
    """The lowercase words and punctuation marks of `texts`, first occurrence order."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            seen.setdefault(w, None)
    return list(seen)


def blip_tokenizer(root: Path, words: Iterable[str] = WORDS, with_blip_tokens: bool = True):
    """A BertTokenizer over `words`; with [DEC] as bos and [ENC] appended unless told not to."""
    from transformers import BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = BERT_SPECIALS + [w for w in dict.fromkeys(words) if w not in BERT_SPECIALS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"), do_lower_case=True)
    if with_blip_tokens:
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok, len(vocab)


def make_blip_checkpoint(
    out: Path,
    arch: str = "BlipForImageTextRetrieval",
    words: Iterable[str] = WORDS,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    with_blip_tokens: bool = True,
    vision_width: int = VISION_WIDTH,
) -> Path:
    """Save a tiny random `arch` (a transformers BLIP class) + tokenizer + image processor in `out`."""
    import torch
    import transformers
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    tok, n_words = blip_tokenizer(out.parent / f"{out.name}.vocab", words, with_blip_tokens)
    text_config = {
        "vocab_size": n_words + 2,  # + [DEC] + [ENC]: BLIP's 30522 + 2
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 40,
        "bos_token_id": n_words,
        "sep_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
        "initializer_range": 0.02,
    }
    config = BlipConfig(
        text_config=text_config, vision_config=vision_config, image_text_hidden_size=16
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():  # no zero biases or unit norms: every weight must be mapped right
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out))
    processor = BlipProcessor(
        BlipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tok,
    )
    processor.save_pretrained(str(out))
    return out
