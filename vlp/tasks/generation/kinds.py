"""The kinds of generator a generation model directory holds (task.json `generator`).

- `unet`: vlp's own `UNetGenerator` (`vlp.tasks.generation.model`), conditioned on the text
  encoder of the directory's vlp model, which it saves with `generator/`;
- `diffusers`: a user's diffusers text-to-image pipeline (`init_from`;
  `vlp.tasks.generation.diffusers_pipeline`), finetuned in full or with LoRA and saved as a
  self-contained pipeline in `generator/`; the directory's vlp model only re-ranks its samples.

`build` makes the one `finetune.generation` describes, `save` writes it into a model directory
being assembled (vlp model included), `load` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.config import Config
    from vlp.tasks.generation.generator import Generator

GENERATOR_DIR = "generator"  # inside a generation model directory
KINDS = ("unet", "diffusers")


def kind_of(cfg: Config) -> str:
    """The kind `finetune.generation` asks for: a pipeline with `init_from`, else vlp's own."""
    return "unet" if cfg.finetune.generation.init_from is None else "diffusers"


def generated_size(cfg: Config) -> int:
    """The side of the generated images: `finetune.generation.image_size`, else the data's."""
    size = cfg.finetune.generation.image_size
    return cfg.data.image_size if size is None else size


def _pipeline_device(cfg: Config) -> torch.device:
    """This process's training device, where a pipeline's parts live while it trains."""
    from vlp.train.distributed import init_distributed
    from vlp.train.settings import resolve_device

    return resolve_device(cfg.runtime.device, init_distributed())


def build(cfg: Config, vlp: Any) -> Generator:
    """The generator `finetune.generation` describes, before training; seed torch first."""
    t = cfg.finetune.generation
    if cfg.finetune.generation.init_from is None:
        from vlp.tasks.generation.model import UNetGenerator

        return UNetGenerator.build(
            vlp,
            image_size=generated_size(cfg),
            block_out_channels=list(t.block_out_channels),
            layers_per_block=t.layers_per_block,
            attention_head_dim=t.attention_head_dim,
            train_timesteps=t.train_timesteps,
            beta_schedule=t.beta_schedule,
            prediction_type=t.prediction_type,
            cond_dropout=t.cond_dropout,
            sampler=t.sampler,
            train_text_encoder=t.train_text_encoder,
            vae_from=t.vae_from,
        )
    from vlp.tasks.generation.diffusers_pipeline import DiffusersPipelineGenerator

    # float32 throughout: the loop's autocast runs bf16 where runtime.precision says so, and
    # the frozen parts are saved as the user's pipeline holds them, not rounded to bf16
    return DiffusersPipelineGenerator.from_directory(
        Path(str(t.init_from)).expanduser(),
        lora_rank=t.lora_rank,
        lora_alpha=t.lora_alpha,
        cond_dropout=t.cond_dropout,
        sampler=t.sampler,
        image_size=generated_size(cfg),
        device=_pipeline_device(cfg),
        dtype=torch.float32,
    )


def _save_unet(generator: Generator, vlp: Any, model_dir: Path) -> None:
    generator.save(model_dir)  # the vlp model it is conditioned on, then generator/


def _save_pipeline(generator: Generator, vlp: Any, model_dir: Path) -> None:
    vlp.cpu().save_pretrained(model_dir)
    generator.save(Path(model_dir) / GENERATOR_DIR)


def _load_unet(model_dir: Path, vlp: Any, device: torch.device) -> Generator:
    from vlp.tasks.generation.model import UNetGenerator

    return UNetGenerator.load(model_dir, device, text_model=vlp)


def _load_pipeline(model_dir: Path, vlp: Any, device: torch.device) -> Generator:
    from vlp.tasks.generation.diffusers_pipeline import DiffusersPipelineGenerator

    return DiffusersPipelineGenerator.load(
        Path(model_dir) / GENERATOR_DIR, device=device, dtype=torch.float32
    )


_SAVE = {"unet": _save_unet, "diffusers": _save_pipeline}
_LOAD = {"unet": _load_unet, "diffusers": _load_pipeline}


def save(kind: str, generator: Generator, vlp: Any, model_dir: Path) -> None:
    """Write the vlp model and the generator (`generator/`) into `model_dir`."""
    _SAVE[kind](generator, vlp, model_dir)


def load(kind: str, model_dir: Path, vlp: Any, device: torch.device) -> Generator:
    """The generator a model directory holds, on `device`; `vlp`: the directory's vlp model."""
    if kind not in KINDS:
        raise ConfigError(
            f"{Path(model_dir) / 'task.json'}: generator {kind!r} is not one of {', '.join(KINDS)}"
        )
    return _LOAD[kind](model_dir, vlp, device)
