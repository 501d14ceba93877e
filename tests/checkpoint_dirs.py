"""Tiny checkpoint directories of every kind `vlp zeroshot` / `vlp embed` read, random weights."""

from __future__ import annotations

import json
import string
from pathlib import Path

from vlp.config import Config

IMAGE_SIZE = 32
TRANSFORM = {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
TEXTS = [
    "a small red circle at the top left",
    "a large blue square in the center",
    "there is a green triangle on the right",
    "the purple diamond is small and sits at the bottom",
    "one shape: an orange cross at the top",
] * 4


def tiny_vlp_dir(cfg: Config, path: Path, rerank_k: int | None = None, seed: int = 0) -> Path:
    """A random smoke-size vlp model directory: the pretrained layout (image_transform.json),
    or with `rerank_k` a finetuned retrieval task model (task.json)."""
    import torch

    from vlp.models import build_model, train_tokenizer
    from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE

    torch.manual_seed(seed)
    model = build_model(cfg.model, train_tokenizer(TEXTS, 120))
    extra: dict = {IMAGE_TRANSFORM_FILE: {**TRANSFORM, "size": IMAGE_SIZE}}
    if rerank_k is not None:
        extra = {
            "task.json": {
                "task": "retrieval",
                "image_size": IMAGE_SIZE,
                "rerank_k": rerank_k,
                "image_transform": TRANSFORM,
            }
        }
    model.save_pretrained(path, extra)
    return path


def tiny_clip_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny transformers CLIPModel directory with its CLIPTokenizer (a character-level
    BPE vocabulary) and CLIPImageProcessor, as `save_pretrained` writes them."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,?!':":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok_dir = path / ".tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **layers,
        ),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(path)
    return path
