"""A tiny random transformers CLIPModel directory, with its own CLIP tokenizer and processor."""

from __future__ import annotations

import json
import string
from pathlib import Path

# byte-level BPE: single characters, the same at the end of a word, a few merges
_CHARS = string.ascii_lowercase + string.digits + "?,.'-"
MERGES = ["r e", "re d</w>", "o f</w>", "t h", "th e</w>"]


def write_clip_tokenizer(path: Path) -> None:
    """vocab.json + merges.txt of a CLIP BPE tokenizer, then saved as transformers does."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [
        *_CHARS,
        *(c + "</w>" for c in _CHARS),
        "re",
        "red</w>",
        "of</w>",
        "th",
        "the</w>",
    ]:
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    CLIPTokenizer.from_pretrained(str(path)).save_pretrained(str(path))


def write_tiny_clip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A random CLIPModel (hidden 32, one layer per tower, projection 16) saved in `path`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_clip_tokenizer(path)
    tok = CLIPTokenizer.from_pretrained(str(path))
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **sizes,
            "num_hidden_layers": 1,
            "vocab_size": len(tok),
            "max_position_embeddings": 40,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={**sizes, "num_hidden_layers": 1, "image_size": image_size, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(path))
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(path))
    return path
