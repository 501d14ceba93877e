"""Training checkpoints: safetensors weights plus a weights-only loadable state dict.

Layout: `<dir>/step-00000120/{model.safetensors,state.pt}`. Each checkpoint is written to
a temp directory and renamed into place, so a kill mid-write never leaves a checkpoint
that looks complete; only the newest `keep` are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from vlp.io import atomic_dir, claim_dir, remove_dir
from vlp.models.weights import save_weights

WEIGHTS = "model.safetensors"
STATE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop or a model may draw from, as tensors and plain types."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )


def save_checkpoint(
    ckpt_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write model weights and `state` as `ckpt_dir/step-<step>` atomically; prune old ones."""
    claim_dir(ckpt_dir, "checkpoints")
    final = ckpt_dir / f"step-{step:08d}"
    with atomic_dir(final, "checkpoint") as tmp:
        save_weights(model, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        remove_dir(old)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` and return the saved loop state (weights-only unpickling)."""
    safetensors.torch.load_model(model, str(path / WEIGHTS))
    return torch.load(path / STATE, weights_only=True, map_location="cpu")
