"""What the generative families (encoder-decoder, t5) share: a model that writes text.

`GenerativeModel` is the base of their models: params' model section (`cfg`), the tokenizer
and the decoder's token ids (`tokens`, `vlp.models.seq2seq_text.DecoderTokens`), the image
tower's token states (`image_states`, whose first token is the global one, as the probe
reads it), decoding to text, and the model-directory read (`from_saved`: the checks, the
tokenizer and the weights around the family's own `from_configs`).

`GenerativeFamily` gives a family module the functions the registry calls
(`vlp.models.family`: `load`, `fresh`, `reads_checkpoint`, `objective`) from its model class,
its name and the `model_type` of the transformers checkpoints it reads.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.seq2seq_text import DecoderTokens, load_text_tokenizer
from vlp.models.weights import (
    CONFIG_NAME,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
    SavedModel,
    check_config,
    checkpoint_model_type,
    load_weights,
    require_weights,
    saved_model_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig
    from vlp.models.objectives import ObjectiveWeights


class GenerativeModel(SavedModel):
    """A model that captions images and answers questions by writing text."""

    CONFIG_KEYS: tuple[str, ...] = ()  # the vlp_config.json entries `from_configs` reads
    tokens: DecoderTokens

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer

    @abstractmethod
    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's token states [B, N, H] for a pixel batch; token 0 is global."""

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of generated ids, special tokens dropped, stripped."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @classmethod
    @abstractmethod
    def from_configs(
        cls,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        meta: dict[str, Any],
        fresh: bool,
    ) -> GenerativeModel:
        """The untrained model the transformers configs of vlp_config.json (`meta`) describe
        (`fresh`: a tower read from a checkpoint starts from its config alone)."""

    @classmethod
    def from_saved(
        cls, p: Path, meta: dict[str, Any], device: str | torch.device = "cpu", fresh: bool = False
    ) -> GenerativeModel:
        """`from_pretrained` of the local model directory `p` whose vlp_config.json is `meta`."""
        check_config(meta, p / CONFIG_NAME, cls.CONFIG_KEYS)
        if not fresh:
            require_weights(p)
        tokenizer = load_text_tokenizer(p / TOKENIZER_DIR, f"{p}/{TOKENIZER_DIR}")
        model = cls.from_configs(saved_model_config(meta), tokenizer, meta, fresh)
        if not fresh:
            load_weights(model, p / WEIGHTS_NAME, device)
        return model.to(device)


def check_heads(cfg: ModelConfig) -> None:
    """ConfigError unless `model.hidden_size` splits into `model.num_heads` heads."""
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"model.hidden_size ({cfg.hidden_size}) must be a multiple of model.num_heads "
            f"({cfg.num_heads})"
        )


def set_decoder_tokens(tokens: DecoderTokens, *configs: Any) -> None:
    """Start, end and padding ids of a decoder written into its (generation) configs."""
    for config in configs:
        config.decoder_start_token_id = tokens.start
        config.eos_token_id = tokens.end
        config.pad_token_id = tokens.pad


@dataclass(frozen=True)
class GenerativeFamily:
    """The registry's functions of a generative family (`vlp.models.family`)."""

    model_class: type[GenerativeModel]
    name: str  # model.family
    model_type: str  # config.json model_type of the transformers checkpoints it reads

    def load(self, p: Path, meta: dict[str, Any], device: str | torch.device) -> Any:
        """The model saved in the vlp model directory `p` (`meta`: its vlp_config.json)."""
        return self.model_class.from_saved(p, meta, device=device)

    def fresh(self, p: Path, meta: dict[str, Any], temperature: float) -> Any:
        """The saved architecture, generation config and tokenizer with fresh weights."""
        return self.model_class.from_saved(p, meta, fresh=True)

    def reads_checkpoint(self, p: Path, key: str) -> bool:
        """Whether `p` is a transformers checkpoint of the family's `model_type`."""
        return checkpoint_model_type(p) == self.model_type

    def objective(self, model: Any, weights: ObjectiveWeights, local_loss: bool) -> Any:
        """The captioning LM loss, weighted `weights.lm` (the only objective it trains)."""
        from vlp.models.objectives import CaptionObjective

        return CaptionObjective(model, weights.lm, self.name)
