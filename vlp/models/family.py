"""Model families: one record each (`Family`), one registry (`FAMILIES`), one loader.

`model.family` names the family a pipeline trains; a saved model directory records its family
in vlp_config.json (`model.family`; directories written before families existed are fusion
models). A family is a record plus one module, its `implementation` (`impl()`), which holds
the torch side and reads no other family's code:

- `build(cfg, tokenizer, temperature)`: a from-scratch model sized by params' `model` section;
- `load(path, meta, device)`: the model a vlp model directory holds (`meta`: its parsed
  vlp_config.json);
- `fresh(path, meta, temperature)`: the same architecture and tokenizer with newly
  initialised weights (the from-scratch ablation; seed torch first);
- `reads_checkpoint(path, key) -> bool`: whether `path` is a foreign checkpoint directory of
  the family's `checkpoint_format` (fusion: transformers BLIP; clip: transformers CLIPModel);
- `load_checkpoint(path, base, temperature, key, as_is)`: that checkpoint as the family's
  model; `base` caps its text length, `temperature` is the contrastive temperature of a
  checkpoint that stores none, `as_is` refuses one whose heads would start untrained;
- `load_tokenizer(path, key)`: a tokenizer directory as the family uses it;
- `untrained_for(path, key, use)` (optional): why a foreign checkpoint cannot be used
  untrained for `use` (`untrained_for` below), or None;
- `objective(model, weights, local_loss)`: the module training `model` with the
  `ObjectiveWeights` of the objectives the family trains (`objectives`).

Every stage, the predictor, zero-shot evaluation and embedding go through this registry and
`load_model`, the one loader of a model directory; nothing else names a family.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from vlp.errors import ConfigError
from vlp.models.adapters import has_adapter, load_adapter
from vlp.models.tokenizer import local_dir
from vlp.models.weights import CONFIG_NAME, read_config

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

    from vlp.config import ModelConfig

VLP_FORMAT = "vlp"  # the checkpoint format of a vlp model directory, whatever its family
# what `vlp zeroshot --task` measures (`vlp.zeroshot`; captioning and vqa: their task
# packages, `vlp.tasks.<task>.zeroshot`); each family lists those its checkpoints do
ZEROSHOT_TASKS = ("retrieval", "classification", "captioning", "vqa")


@dataclass(frozen=True)
class Family:
    """One model family: what its models are and do, and the module that builds and loads them."""

    name: str  # model.family
    description: str  # what its models are, in messages
    objectives: tuple[str, ...]  # the `ObjectiveWeights` it trains; the others are ignored
    tasks: tuple[str, ...]  # the downstream tasks it can be finetuned for
    # what `vlp zeroshot` measures its checkpoints on untrained (of `ZEROSHOT_TASKS`)
    zeroshot_tasks: tuple[str, ...]
    has_itm: bool  # scores (image, text) pairs with an ITM head (re-ranking)
    # can answer VQA by writing the answer after the question (`answer_loss`,
    # `generate_answers`): BLIP's answer decoder, GPT-2 or T5
    generates_answers: bool
    # can answer VQA with vlp's answer classifier over its encoders (`finetune.vqa.head:
    # classifier`); a family without one writes its answers whatever the head says
    answer_classifier: bool
    checkpoint_format: str  # the foreign checkpoint directories it reads
    loads_image_tower: bool  # its image tower can start from a checkpoint (model.image_pretrained)
    # the modules a peft adapter adapts unless `finetune.<task>.lora_targets` names others:
    # the attention query and value projections of each tower it may hold (peft matches a
    # module whose name is, or ends with ".", one of these)
    lora_targets: tuple[str, ...]
    implementation: str  # module with build, load, fresh, checkpoints, tokenizer, objective

    def impl(self) -> ModuleType:
        """The family's implementation, its torch side (imported on first use)."""
        return importlib.import_module(self.implementation)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="fusion",
            description="an image-grounded text encoder and decoder (BLIP)",
            objectives=("itc", "itm", "lm"),
            tasks=("retrieval", "captioning", "vqa", "generation"),
            zeroshot_tasks=("retrieval", "classification", "vqa"),
            has_itm=True,
            generates_answers=True,
            answer_classifier=True,
            checkpoint_format="blip",
            loads_image_tower=True,
            lora_targets=("query", "value", "q_proj", "v_proj", "qkv"),
            implementation="vlp.models.fusion",
        ),
        Family(
            name="clip",
            description="a dual encoder: image and text embeddings, no fusion encoder or decoder",
            objectives=("itc",),
            tasks=("retrieval", "generation"),
            zeroshot_tasks=("retrieval", "classification"),
            has_itm=False,
            generates_answers=False,
            answer_classifier=False,
            checkpoint_format="clip",
            loads_image_tower=False,
            lora_targets=("q_proj", "v_proj"),
            implementation="vlp.models.clip",
        ),
        Family(
            name="encoder-decoder",
            description="a vision transformer read by a GPT-2 decoder (VisionEncoderDecoderModel)",
            objectives=("lm",),
            tasks=("captioning", "vqa"),
            zeroshot_tasks=("captioning", "vqa"),
            has_itm=False,
            generates_answers=True,
            answer_classifier=False,
            checkpoint_format="vision-encoder-decoder",
            loads_image_tower=True,
            lora_targets=("query", "value", "q_proj", "v_proj", "c_attn"),
            implementation="vlp.models.encoder_decoder",
        ),
        Family(
            name="t5",
            description="image tokens read with the text by a T5 encoder-decoder (VL-T5)",
            objectives=("lm",),
            tasks=("captioning", "vqa"),
            zeroshot_tasks=("captioning", "vqa"),
            has_itm=False,
            generates_answers=True,
            answer_classifier=False,
            checkpoint_format="t5",
            loads_image_tower=True,
            lora_targets=("q", "v", "query", "value", "q_proj", "v_proj"),
            implementation="vlp.models.t5",
        ),
    )
}
DEFAULT_FAMILY = "fusion"  # of model directories written before families existed


def get_family(name: Any, where: str = "model.family") -> Family:
    """The family called `name`; ConfigError naming `where` and the known families otherwise."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ConfigError(f"{where}: {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def read_meta(p: Path) -> dict[str, Any] | None:
    """The checked vlp_config.json of a directory (`read_config`), or None when it has none
    (not a vlp model directory)."""
    if not (p / CONFIG_NAME).is_file():
        return None
    return read_config(p)


def _foreign_family(p: Path, key: str) -> Family:
    """The family that reads the foreign checkpoint `p`; ConfigError naming `key` if none does."""
    for family in FAMILIES.values():
        if family.impl().reads_checkpoint(p, key):
            return family
    model_type = None
    if (p / "config.json").is_file():
        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{key}: cannot read {p / 'config.json'}: {e}") from None
    formats = ", ".join(f.checkpoint_format for f in FAMILIES.values())
    raise ConfigError(
        f"{key}: {p} is not a vlp model directory (no {CONFIG_NAME}) nor a transformers "
        f"checkpoint a model family reads ({formats}); its model type: {model_type!r}"
    )


def recognise(p: Path, key: str) -> tuple[Family, dict[str, Any] | None]:
    """(family, vlp_config.json or None for a foreign checkpoint) of the local directory `p`."""
    meta = read_meta(p)
    if meta is None:
        return _foreign_family(p, key), None
    name = meta["model"].get("family", DEFAULT_FAMILY)
    return get_family(name, f"{p / CONFIG_NAME}: model.family"), meta


def model_family(path: str | os.PathLike, key: str = "model directory") -> str:
    """The family of a vlp model directory or of a foreign checkpoint a family reads."""
    return recognise(local_dir(path, key), key)[0].name


def task_not_applicable(family: str, task: str) -> str | None:
    """Why a model of `family` cannot be finetuned for `task`, or None when it can."""
    f = get_family(family)
    if task in f.tasks:
        return None
    return (
        f"model.family {f.name} ({f.description}) does not do {task}; it does {', '.join(f.tasks)}"
    )


def zeroshot_not_applicable(family: Family, task: str | None) -> str | None:
    """Why `vlp zeroshot` cannot measure a model of `family` on `task` (None: the contrastive
    embeddings `vlp embed` exports), as "a model of the <family> family (...): why"; None
    when it can."""
    contrastive = "itc" in family.objectives
    if (task is None and contrastive) or task in family.zeroshot_tasks:
        return None
    if not contrastive:
        why = f"it has no contrastive embeddings {'to export' if task is None else 'for ' + task}"
    else:
        why = f"vlp zeroshot does not measure it on {task}"
    return (
        f"a model of the {family.name} family ({family.description}): {why}; vlp zeroshot "
        f"measures it on {', '.join(family.zeroshot_tasks)} (--task)"
    )


def check_init_from(cfg: ModelConfig) -> Family:
    """The family of `model.init_from`, checked against `model.family`."""
    assert cfg.init_from, "model.init_from is not set"
    family, _ = recognise(local_dir(cfg.init_from, "model.init_from"), "model.init_from")
    get_family(cfg.family)
    if family.name != cfg.family:
        raise ConfigError(
            f"model.init_from: {cfg.init_from} holds a {family.name} model but model.family is "
            f"{cfg.family!r}: set model.family: {family.name}"
        )
    return family


@dataclass
class LoadedModel:
    """A loaded model directory: its family, its model, and what the directory records."""

    family: Family
    path: Path
    model: Any  # encode_image, encode_text, tokenize; itm_logits when family.has_itm
    format: str  # "vlp" (a vlp model directory) or the family's foreign checkpoint format
    key: str  # what named the directory, in messages

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_itm(self) -> bool:
        """Whether the model scores (image, text) pairs with an ITM head (re-ranking)."""
        return self.family.has_itm

    @cached_property
    def task_info(self) -> dict[str, Any] | None:
        """The task.json of a finetuned task model; None for any other directory."""
        from vlp.models.checkpoints import read_task_info
        from vlp.tasks import TASK_FILE

        return read_task_info(self.path) if (self.path / TASK_FILE).is_file() else None

    @cached_property
    def transform(self) -> Any:
        """The evaluation image transform (`pixels(images) -> [N, 3, H, W]`) it expects."""
        from vlp.models.checkpoints import directory_transform

        return directory_transform(self.path, self.task_info, self.format != VLP_FORMAT, self.key)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image states [B, N, H], L2-normalised features [B, E]) of a pixel batch."""
        return self.model.encode_image(pixels.to(self.device))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features [M, E] of one batch of texts."""
        enc = self.model.tokenize(list(texts))
        return self.model.encode_text(
            enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        )[1]


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    key: str = "model directory",
    base: ModelConfig | None = None,
    temperature: float | None = None,
    as_is: bool = False,
) -> LoadedModel:
    """Load the model directory `path`: a vlp model directory of any family, or a foreign
    checkpoint a family reads (`Family.checkpoint_format`). A directory holding a peft
    adapter (`vlp.models.adapters`) loads with the adapter applied.

    A foreign checkpoint reads texts up to its own text positions unless `base.max_text_length`
    sets a length (`towers.checkpoint_text_length`); `temperature` is the contrastive temperature of one that stores none; `as_is`
    (a checkpoint used untrained) refuses one whose heads would start untrained. ConfigError
    naming `key` for anything else.
    """
    p = local_dir(path, key)
    family, meta = recognise(p, key)
    impl = family.impl()
    if meta is not None:
        model = impl.load(p, meta, device)
        if has_adapter(p):  # a task model finetuned with a peft adapter: base + adapter
            model = load_adapter(model, p, device)
        return LoadedModel(family, p, model, VLP_FORMAT, key)
    model = impl.load_checkpoint(p, base, temperature, key, as_is).to(device)
    return LoadedModel(family, p, model, family.checkpoint_format, key)


USES = ("retrieval", "vqa")  # what a checkpoint can be used for untrained (`untrained_for`)


def untrained_for(path: str | os.PathLike, use: str, key: str = "model directory") -> str | None:
    """Why the directory at `path` cannot be used untrained for `use`, or None when it can.

    `use`: "retrieval" (its ITC embeddings and ITM head score pairs) or "vqa" (it writes
    answers). A foreign checkpoint answers through its family's `untrained_for(path, key,
    use)` (a family without one: None); a vlp model directory holds what training made of
    it: None. `vlp zeroshot` refuses with this reason and pretraining's zero-shot check of an
    untrained checkpoint is skipped with it.
    """
    if use not in USES:
        raise ValueError(f"use {use!r} is not one of {', '.join(USES)}")
    p = local_dir(path, key)
    family, meta = recognise(p, key)
    check = None if meta is not None else getattr(family.impl(), "untrained_for", None)
    return None if check is None else check(p, key, use)


def _check_temperature(temperature: float | None) -> float:
    """`model.temperature`, which only a saved model's config leaves unset."""
    if temperature is None or temperature <= 0:
        raise ConfigError(f"model.temperature: must be a number > 0, got {temperature}")
    return temperature


def fresh_model(path: str | os.PathLike, temperature: float) -> Any:
    """A model of the same family, architecture and tokenizer as the one saved in `path`,
    with freshly initialised weights (the from-scratch ablation); seed torch first.

    `temperature` initialises the contrastive temperature (model.temperature).
    """
    p = local_dir(path, "model directory")
    family, meta = recognise(p, "model directory")
    if meta is None:
        raise ConfigError(f"{p}: not a vlp model directory (no {CONFIG_NAME})")
    return family.impl().fresh(p, meta, _check_temperature(temperature))


def build_from_params(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, temperature: float
) -> Any:
    """The model `cfg` (params' model section) describes, before any training.

    With `model.init_from`: that checkpoint's model with its weights and its own tokenizer
    (`tokenizer` unused): a vlp model directory or a foreign checkpoint of `model.family`;
    parts a checkpoint lacks start from torch's RNG, so seed it first. Without: a from-scratch
    model of `model.family` sized by `cfg` with `tokenizer`. `temperature`
    (model.temperature) initialises the contrastive temperature of a model that has none.
    """
    family = get_family(cfg.family)
    temperature = _check_temperature(temperature)
    if cfg.init_from:
        check_init_from(cfg)
        loaded = load_model(cfg.init_from, key="model.init_from", base=cfg, temperature=temperature)
        return loaded.model
    if tokenizer is None:
        raise ConfigError(f"a from-scratch {cfg.family} model needs a tokenizer")
    if cfg.max_text_length is None:
        raise ConfigError(
            "model.max_text_length: null means the text length of model.init_from's checkpoint; "
            "a model built from params needs a number"
        )
    return family.impl().build(cfg, tokenizer, temperature)
