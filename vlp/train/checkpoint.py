"""Training checkpoints: safetensors weights plus a weights-only loadable state dict.

Layout: `<dir>/step-00000120/{model.safetensors,state.pt}`. Each checkpoint is written to
a temp directory and renamed into place, so a kill mid-write never leaves a checkpoint
that looks complete; only the newest `keep` are kept.

A stage's work folder (checkpoints of all its phases, anything else it needs to resume)
belongs to one run: `claim_work_dir` empties it when a run starts afresh and records in
`run.json` the fingerprint of what the run trains with (params and data hash), which a
resumed run must match.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from vlp.errors import ResumeError
from vlp.io import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_write_json,
    check_replaceable,
    claim_dir,
    remove_dir,
)
from vlp.models.weights import save_weights

WEIGHTS = "model.safetensors"
STATE = "state.pt"
RUN_RECORD = "run.json"
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


def fingerprint_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words, or None when they are equal.

    E.g. `params (pretrain.lr 0.001 -> 0.002)` or `data (7c01... -> 9e4f...)`.
    """
    now = json.loads(json.dumps(now))  # compare as stored: tuples are lists in JSON
    parts = []
    for part in sorted(set(saved) | set(now)):
        old, new = saved.get(part), now.get(part)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5]]
            parts.append(f"{part} ({', '.join(shown)}{', ...' if len(keys) > 5 else ''})")
        else:
            parts.append(f"{part} ({old!r} -> {new!r})")
    return "; ".join(parts) or None


def claim_work_dir(work: Path, fingerprint: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Make `work` this run's work folder; return its record (`run.json`).

    A fresh run (not `resume`) swaps in an empty folder holding only the record
    `{"fingerprint": ...}` before anything trains, so no checkpoint of an earlier run can
    be picked up later. With `resume`, a non-empty folder must carry a record with the
    same fingerprint (else ResumeError naming what differs); the record is returned as
    it is, with whatever the interrupted run added to it. An empty or absent folder is
    claimed as by a fresh run.
    """
    work = Path(work)
    record_path = work / RUN_RECORD
    if resume and work.is_dir() and any(p.name != OUTPUT_MARKER for p in work.iterdir()):
        check_replaceable(work)
        if not record_path.is_file():
            raise ResumeError(
                f"{work}: no {RUN_RECORD} records which run wrote these checkpoints; "
                "start without --resume"
            )
        record = json.loads(record_path.read_text())
        if diff := fingerprint_difference(record.get("fingerprint", {}), fingerprint):
            raise ResumeError(
                f"{work}: its checkpoints were written with other {diff}; --resume needs "
                "the same params and data (or start without --resume)"
            )
        return record
    record = {"fingerprint": fingerprint}
    with atomic_dir(work, "pretrain-work") as tmp:
        atomic_write_json(tmp / RUN_RECORD, record)
    return json.loads(record_path.read_text())


def update_run_record(work: Path, **fields: Any) -> None:
    """Add `fields` to the work folder's `run.json` (atomically)."""
    path = Path(work) / RUN_RECORD
    atomic_write_json(path, {**json.loads(path.read_text()), **fields})
