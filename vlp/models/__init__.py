"""Models: image towers, BLIP text encoder/decoder, the CLIP dual encoder, objectives, tokenizer.

Public API: `build_model`, `VLPModel`, `CLIPDualEncoder`, `load_model` (any model directory,
by its family: `vlp.models.family`), `VLPObjective`, `CLIPObjective`, `ObjectiveWeights`, `build_tokenizer`,
`train_tokenizer`, `load_tokenizer`, `save_tokenizer`. Imports are lazy
(see `__getattr__`) so `import vlp.models` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "VLPModel": "vlp.models.vlp_model",
    "build_model": "vlp.models.vlp_model",
    "CLIPDualEncoder": "vlp.models.clip",
    "load_model": "vlp.models.family",
    "VLPObjective": "vlp.models.objectives",
    "CLIPObjective": "vlp.models.objectives",
    "ObjectiveWeights": "vlp.models.objectives",
    "build_tokenizer": "vlp.models.tokenizer",
    "train_tokenizer": "vlp.models.tokenizer",
    "load_tokenizer": "vlp.models.tokenizer",
    "save_tokenizer": "vlp.models.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlp.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
