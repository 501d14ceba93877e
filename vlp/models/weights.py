"""A saved vlp model directory: its layout, and safetensors weights whose bytes depend on the
weights alone.

Every family writes the same layout: `model.safetensors`, `vlp_config.json` (the `model`
params it was built from plus the transformers configs it needs to rebuild itself),
`tokenizer/`, and the JSON files a stage adds (the image transform, `task.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.errors import ConfigError
from vlp.io import atomic_dir, umask

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlp_config.json"
TOKENIZER_DIR = "tokenizer"


class SavedModel(torch.nn.Module, ABC):
    """What every model family shares: its `cfg` (params' model section) and `tokenizer`,
    text inputs, a parameter count and the model-directory write (`save_pretrained`).

    A family gives the transformers configs that rebuild it (`architecture_configs`).
    """

    cfg: Any
    tokenizer: Any

    @abstractmethod
    def architecture_configs(self) -> dict[str, Any]:
        """vlp_config.json entries besides `model`: the transformers configs as dicts."""

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise texts to {"input_ids", "attention_mask"} (padded to the longest, truncated
        at `max_length`, default `cfg.max_text_length`) on this model's device."""
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=max_length or self.cfg.max_text_length,
            return_tensors="pt",
        )
        device = next(self.parameters()).device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def save_pretrained(
        self, path: str | os.PathLike, extra_json: dict[str, Any] | None = None
    ) -> None:
        """Write model.safetensors + vlp_config.json + tokenizer/ into `path`, atomically.

        `extra_json` maps further file names to JSON content written in the same step.
        """
        meta = {"model": dataclasses.asdict(self.cfg), **self.architecture_configs()}
        with atomic_dir(Path(path), "model") as tmp:
            save_weights(self, tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            for name, content in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def read_saved(p: Path) -> dict[str, Any]:
    """The parsed vlp_config.json of the model directory `p`; ConfigError unless `p` holds
    it and the weights."""
    if not (p / CONFIG_NAME).exists() or not (p / WEIGHTS_NAME).exists():
        raise ConfigError(f"{p}: not a saved VLP model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    return json.loads((p / CONFIG_NAME).read_text())


def saved_model_config(meta: dict[str, Any]) -> Any:
    """The `ModelConfig` a vlp_config.json records; entries it does not know (e.g. the
    `loss_weights` older model directories carry) are ignored."""
    from vlp.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})


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
