"""The fusion family (`model.family: fusion`): `VLPModel`, trained with ITC + ITM + LM.

Its models are built from params (`vlp.models.vlp_model.build_model`), saved and reloaded as
vlp model directories, and read from transformers BLIP checkpoints (`vlp.models.blip`), the
foreign checkpoint format of the family. This module is what the family's record
(`vlp.models.family.FAMILIES`) names as its implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.blip import blip_architecture, load_blip
from vlp.models.tokenizer import load_tokenizer
from vlp.models.vlp_model import VLPModel, build_model
from vlp.models.weights import TOKENIZER_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig
    from vlp.models.objectives import ObjectiveWeights

# What a BLIP checkpoint used untrained is used for -> the one class that trained the parts
# it needs: retrieval encodes with the ITC projections and re-ranks with the ITM head (the
# other classes lack them: they would start random); VQA writes answers with the answer
# decoder reading the fused question (a retrieval class's decoder would start random, a
# captioning class's reads image tokens, not questions).
TRAINED_FOR = {
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
_TRAINED_PARTS = {
    "retrieval": "the trained ITC and ITM heads that encode and re-rank",
    "vqa": "the answer decoder trained to answer the fused question",
}


def build(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, temperature: float) -> VLPModel:
    """A from-scratch (or `*_pretrained` towers') VLPModel sized by params' model section."""
    return build_model(cfg, tokenizer, temperature=temperature)


def load(p: Path, meta: dict[str, Any], device: str | torch.device) -> VLPModel:
    """The VLPModel saved in the vlp model directory `p` (`meta`: its vlp_config.json)."""
    return VLPModel.from_saved(p, meta, device=device)


def fresh(p: Path, meta: dict[str, Any], temperature: float) -> VLPModel:
    """The saved architecture and tokenizer with freshly initialised weights; seed torch first."""
    from vlp.config import ModelConfig

    saved = meta["model"]
    if any(saved.get(key) for key in ("init_from", "image_pretrained", "text_pretrained")):
        # The architecture (or a tower of it) came from a checkpoint (e.g. BLIP's, a BERT),
        # not from the model params: rebuilt from the configs saved with it, so that no
        # checkpoint's weights are read again.
        model = VLPModel.from_saved(p, meta, fresh=True)
        with torch.no_grad():
            model.temp.fill_(temperature)
        return model
    tokenizer = load_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
    return build_model(ModelConfig(**{**saved, "temperature": None}), tokenizer, temperature)


def reads_checkpoint(p: Path, key: str) -> bool:
    """Whether `p` is a transformers BLIP checkpoint (ConfigError for a BLIP class vlp does
    not load)."""
    return blip_architecture(p, key) is not None


def untrained_for(p: Path, key: str, use: str) -> str | None:
    """Why the BLIP checkpoint `p` cannot be used untrained for `use` (`TRAINED_FOR`), or None.

    None too for a directory that holds no BLIP checkpoint.
    """
    arch = blip_architecture(p, key)
    want = TRAINED_FOR[use]
    if arch is None or arch == want:
        return None
    return f"{key}: {p} holds a {arch}; only {want} has {_TRAINED_PARTS[use]}"


def load_checkpoint(
    p: Path, base: ModelConfig | None, temperature: float | None, key: str, as_is: bool
) -> VLPModel:
    """The BLIP checkpoint `p` as a VLPModel (`vlp.models.blip.load_blip`); seed torch first.

    `as_is`: it is used untrained for retrieval, so only a class with trained ITC and ITM
    heads will do (`untrained_for`).
    """
    reason = untrained_for(p, key, "retrieval") if as_is else None
    if reason is not None:
        raise ConfigError(reason)
    if temperature is None:
        raise ConfigError(f"{key}: a BLIP checkpoint loads with a contrastive temperature")
    return load_blip(p, base, temperature, key)


def objective(model: VLPModel, weights: ObjectiveWeights, local_loss: bool) -> Any:
    """`VLPObjective`: ITC, ITM and LM, each weighted by `weights`."""
    from vlp.models.objectives import VLPObjective

    return VLPObjective(model, weights, local_loss=local_loss)
