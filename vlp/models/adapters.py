"""Parameter-efficient adapters (🤗 peft) on a model of any family.

`attach_adapter` injects LoRA (or DoRA) layers into the modules a family names
(`Family.lora_targets`) and freezes every other weight of the model; the model object stays
what it was (its methods, its place inside a task's module), now with adapter layers.
`save_adapter` writes the adapter in peft's own format (`PeftModel.save_pretrained`:
`adapter_config.json` + `adapter_model.safetensors`) and takes the layers out again, so the
model saves as its untouched base. A model directory holding both is a base plus an adapter:
`load_model` (`vlp.models.family`) loads the base and applies the adapter
(`PeftModel.from_pretrained`), which is what every stage, predictor and served model sees.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"  # peft's file names, as PeftModel.save_pretrained writes
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to attach: `kind` (lora | dora), its rank, alpha, dropout and targets."""

    kind: str
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def check(self, where: str) -> None:
        """ConfigError naming `where.<key>` for a value peft would refuse or misuse."""
        problems = [
            (self.kind not in ("lora", "dora"), "adapter", f"{self.kind!r} is not lora or dora"),
            (self.rank < 1, "lora_rank", f"must be >= 1, got {self.rank}"),
            (self.alpha <= 0, "lora_alpha", f"must be > 0, got {self.alpha}"),
            (not 0 <= self.dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.dropout}"),
            (not self.targets, "lora_targets", "names no module"),
        ]
        for bad, key, message in problems:
            if bad:
                raise ConfigError(f"{where}.{key}: {message}")


def attach_adapter(model: torch.nn.Module, spec: AdapterSpec, where: str) -> PeftModel:
    """Inject `spec`'s adapter into `model` in place and freeze the rest of `model`; the
    returned PeftModel saves it (`save_adapter`). ConfigError naming `where` if it cannot."""
    from peft import LoraConfig, get_peft_model

    spec.check(where)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        use_dora=spec.kind == "dora",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # no module matches, or one peft cannot adapt
        raise ConfigError(f"{where}.lora_targets: {list(spec.targets)}: {e}") from None


def save_adapter(
    adapted: PeftModel, model_dir: Path, save_base: Callable[[Path], None]
) -> torch.nn.Module:
    """Write the adapter of `adapted` into `model_dir` in peft's format, after `save_base`
    has written the model without it (the adapter layers are taken out first); return the
    model as it was before `attach_adapter`."""
    with tempfile.TemporaryDirectory() as held:
        adapted.save_pretrained(held)  # while the adapter layers are in place
        base = adapted.unload()
        save_base(model_dir)  # may replace model_dir's contents: the adapter goes in after
        for path in sorted(Path(held).iterdir()):
            shutil.copy2(path, Path(model_dir) / path.name)
    return base


def has_adapter(model_dir: Path) -> bool:
    """Whether a model directory holds a peft adapter for its model."""
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def load_adapter(model: torch.nn.Module, model_dir: Path, device: Any) -> torch.nn.Module:
    """`model` (the directory's base) with the directory's adapter applied, for inference."""
    from peft import PeftModel

    try:
        PeftModel.from_pretrained(model, str(model_dir), torch_device=str(device))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{model_dir}/{ADAPTER_CONFIG}: cannot apply the adapter: {e}") from None
    return model.to(device)


def trainable_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of `module` (`parameters()`: tied ones once)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
