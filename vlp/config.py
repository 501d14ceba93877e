"""params.yaml -> typed configuration, in one place.

`params.yaml` holds the default profile at the top level and named overlays under
`profiles:` (e.g. `smoke`). The key `profile:` selects the overlay, which is deep-merged
over the defaults. Every stage reads its own section of the resulting `Config`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlp.errors import ConfigError
from vlp.tasks import get_task
from vlp.tasks.captioning import CaptioningConfig
from vlp.tasks.retrieval import RetrievalConfig
from vlp.tasks.spec import FinetuneBudget
from vlp.tasks.vqa import VQAConfig

DEFAULT_PARAMS = Path("params.yaml")


@dataclass
class DataConfig:
    """The embedded shapes world: sizes of each split and rendering."""

    root: str = "data/shapes"
    seed: int = 0
    image_size: int = 64
    n_pretrain: int = 4000
    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    captions_per_image: int = 5
    questions_per_image: int = 6


@dataclass
class ValidateConfig:
    """Bounds that `vlp validate` enforces on manifests and images."""

    report_dir: str = "reports/validation"
    min_caption_chars: int = 3
    max_caption_chars: int = 300
    min_image_side: int = 16
    max_image_side: int = 4096


@dataclass
class ModelConfig:
    """Architecture of the towers; `*_pretrained` load a local directory instead."""

    image_tower: str = "cnn"  # cnn | vit | convnext
    image_pretrained: str | None = None
    text_pretrained: str | None = None
    tokenizer_pretrained: str | None = None
    vocab_size: int = 400
    hidden_size: int = 128
    num_text_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    embed_dim: int = 128
    max_text_length: int = 32
    patch_size: int = 8
    num_image_layers: int = 2
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128])


@dataclass
class PretrainConfig:
    """Pretraining loop and objective weights (a weight of 0 switches an objective off)."""

    out_dir: str = "models/pretrained"
    epochs: int = 2
    max_steps: int = -1
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    temperature: float = 0.07
    checkpoint_every: int = 200
    num_workers: int = 0
    log_every: int = 10
    # Steps of a captioning-only phase before the joint one: the LM alone, on each image's
    # first caption (0 = none). It teaches the image tower what the objects are quickly.
    caption_warmup_steps: int = 0


@dataclass
class FinetuneConfig:
    """Per-task finetuning; `ablation` also trains each task from scratch for comparison.

    Each task's section is its own dataclass (`vlp.tasks.<task>`): a key that means nothing
    for a task is an unknown key.
    """

    retrieval: RetrievalConfig
    captioning: CaptioningConfig
    vqa: VQAConfig
    out_dir: str = "models/finetuned"
    ablation: bool = True

    def task(self, name: str) -> FinetuneBudget:
        """The params section of task `name`."""
        return getattr(self, get_task(name).name)


# The VQA accuracy protocols of vlp.metrics.vqa (kept here so the CLI need not import torch).
VQAProtocol = Literal["official", "lavis"]
VQA_PROTOCOLS: tuple[str, ...] = typing.get_args(VQAProtocol)


@dataclass
class EvaluateConfig:
    """Where evaluation writes metrics, plots and results files."""

    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    results_dir: str = "results"
    batch_size: int = 128
    split: str = "test"  # the manifest split every task is evaluated on
    data_root: str | None = None  # dataset to evaluate on; None: data.root
    num_examples: int = 8  # qualitative examples logged per task
    vqa_protocol: VQAProtocol = "official"  # answer normalisation (vlp.metrics.vqa)


@dataclass
class TrackingConfig:
    """MLflow tracking; `MLFLOW_TRACKING_URI` in the environment overrides `uri`."""

    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "vlp"


@dataclass
class RegistryConfig:
    """Model registry names; each task's primary metric (vlp.tasks) gates its promotion."""

    name_prefix: str = "vlp-"
    auto_promote: bool = True


@dataclass
class ServingConfig:
    """Request limits of the served pyfunc; recorded in the model when it is registered."""

    max_image_pixels: int = 16_777_216  # 4096 x 4096: a 12-megapixel photo passes
    max_rows: int = 64  # the predictors' batch size: one request, one forward batch


@dataclass
class ScheduleConfig:
    """Prefect deployment schedule and retries of a failed stage (transient errors)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    deployment: str = "vlp-nightly"
    retries: int = 2
    retry_delay_s: float = 30.0


@dataclass(kw_only=True)
class Config:
    profile: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig  # required: the task sections have no defaults
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none), for lineage tags."""
        d = self.to_dict()
        picked = {k: d[k] for k in sections} if sections else d
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            _type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items()
        )
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if isinstance(tp, type):
        return {
            "int": "an integer",
            "float": "a number",
            "str": "a string",
            "bool": "true/false",
        }.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{unknown[0]} in params")
    kwargs = {}
    for name in names & set(raw):
        tp, value, key = hints[name], raw[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not _type_ok(value, tp):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
            kwargs[name] = value
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"missing key {where + '.' if where else ''}{missing[0]} in params")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], profile: str | None = None) -> Config:
    """Build a Config from a params mapping, applying `profiles[profile]` as an overlay."""
    raw = dict(raw or {})
    profiles = raw.pop("profiles", {}) or {}
    chosen = profile or raw.get("profile", "default")
    if chosen != "default":
        if chosen not in profiles:
            raise ConfigError(
                f"profile {chosen!r} is not defined under 'profiles' "
                f"(known: {', '.join(['default', *profiles])})"
            )
        raw = _deep_merge(raw, profiles[chosen])
    raw["profile"] = chosen
    return _build(Config, raw, "")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a params mapping."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return out


def load_config(
    path: str | os.PathLike = DEFAULT_PARAMS,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read params.yaml (missing file: all defaults), apply profile and overrides."""
    p = Path(path)
    raw: dict[str, Any] = {}
    if p.exists():
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, profile)


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI: `MLFLOW_TRACKING_URI` if set, else params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
