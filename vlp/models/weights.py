"""A saved vlp model directory: its layout, and safetensors weights whose bytes depend on the
weights alone.

Every family writes the same layout: `model.safetensors`, `vlp_config.json` (the `model`
params it was built from plus the transformers configs it needs to rebuild itself),
`tokenizer/`, and the JSON files a stage adds (the image transform, `task.json`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.io import atomic_dir, umask

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlp_config.json"
TOKENIZER_DIR = "tokenizer"


def save_model_dir(
    module: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    meta: dict[str, Any],
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Write weights, `meta` as vlp_config.json, the tokenizer and `extra_json` (file name ->
    JSON content) into the model directory `path`, atomically."""
    with atomic_dir(Path(path), "model") as tmp:
        save_weights(module, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} of `texts`, padded to the longest and truncated, on `device`."""
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def num_parameters(module: torch.nn.Module) -> int:
    """Number of distinct parameters of `module` (tied tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def save_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write `module`'s state dict to `path` as safetensors, tied tensors stored once.

    As `safetensors.torch.save_model` (which `load_model` reads), but the header's
    metadata (one entry per dropped alias of a tied tensor) is sorted: the writer emits it
    in the order of a hash map seeded per process, so identical weights gave files whose
    bytes differed from run to run, and DVC saw a changed output. The file gets the mode
    of any new file (the writer makes it private).
    """
    from safetensors.torch import save_model

    save_model(module, str(path))
    os.chmod(path, 0o666 & ~umask())
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        if not metadata:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        # Same entries in another order: never longer; the header is space-padded anyway.
        f.seek(8)
        f.write(text.ljust(size, b" "))
