"""Tiny checkpoint directories of every kind `vlp zeroshot` / `vlp embed` read, random weights."""

from __future__ import annotations

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
    model = build_model(cfg.model, train_tokenizer(TEXTS, 120), 0.07)
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
