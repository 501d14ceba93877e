"""params.yaml -> typed configuration, in one place.

`params.yaml` holds every setting of the default pipeline and is the one source of
defaults: the dataclasses below have none, so a missing key or file is a ConfigError.
`profiles.yaml` beside it holds named overlays (e.g. `smoke`, tiny sizes for tests),
applied with `--profile`; `--set section.key=value` overrides are applied after the
profile. Profiles are not DVC params, so editing one leaves the default pipeline up to
date; a profile's commands write under `profiles/<name>/` (`profile_output_settings`), so
they never overwrite the default pipeline's outputs. Each stage reads its own section plus `seed`, `runtime`, `data`, `model` and
`tracking`; the training stages also read `images`.

The module is long because it is one concept: the typed schema of params.yaml, every
section's dataclass beside the one reader that builds, checks and overlays them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
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
from vlp.tasks.generation import GenerationConfig
from vlp.tasks.retrieval import RerankScore, RetrievalConfig
from vlp.tasks.spec import FinetuneBudget
from vlp.tasks.vqa import VQAConfig

DEFAULT_PARAMS = Path("params.yaml")
PROFILES_FILE = "profiles.yaml"
# Where `vlp generate` writes (the generate stage's out in dvc.yaml); the stages read
# `data.root`, which is this folder unless it names a dataset of the user's.
SHAPES_DIR = "data/shapes"
# Where a profile's runs write in the workspace (`profiles/<name>/metrics`, ...), apart from
# the default pipeline's DVC outputs.
PROFILES_DIR = Path("profiles")
# Every key naming a folder the stages write, or read from another stage's output: under a
# profile each moves into the profile's folder, so one profile stage feeds the next.
OUTPUT_KEYS: tuple[tuple[str, str], ...] = (
    ("runtime", "metrics_dir"),
    ("runtime", "plots_dir"),
    ("validate", "report_dir"),
    ("pretrain_vision", "out_dir"),
    ("pretrain", "out_dir"),
    ("finetune", "init_dir"),
    ("finetune", "out_dir"),
    ("evaluate", "models_dir"),
    ("evaluate", "results_dir"),
)
# Keys naming a dataset: under a profile they move with the outputs only when they name
# the shapes world `vlp generate` writes, never a dataset of the user's.
DATA_KEYS: tuple[tuple[str, str], ...] = (("data", "root"), ("evaluate", "data_root"))
# An int param must fit the 64-bit integers torch and numpy take (seeds, sizes, steps).
INT_LIMIT = 2**63


@dataclass
class DataConfig:
    """The dataset every stage reads (`root`), the embedded shapes world's sizes and rendering,
    and the webdataset shards training may stream its pairs from instead (`vlp.data.shards`)."""

    root: str
    shards: str | None  # a `vlp shard` directory pretraining and pair finetuning stream from
    shuffle_buffer: int  # samples each streaming worker shuffles among (shards only)
    seed: int
    image_size: int
    n_pretrain: int
    n_train: int
    n_val: int
    n_test: int
    captions_per_image: int
    questions_per_image: int


@dataclass
class ImagesConfig:
    """How images become model inputs (`vlp.data.images`).

    `resize`, `mean` and `std` are the evaluation transform every model records and its
    predictors and serving reuse, unless the pretrained checkpoint brings an image processor,
    which replaces them; `train_crop_scale` and `hflip` are training augmentation.
    """

    size: int | None  # side; None: the pretrained processor's size, else data.image_size
    resize: Literal["squash", "shorter_side_crop"]
    mean: list[float]  # R, G, B
    std: list[float]
    train_crop_scale: list[float]  # [min, max] area fraction of a random resized crop; [1, 1]: off
    hflip: bool  # random horizontal flip; swaps the words left and right in the texts
    # reduced-scale JPEG decoding (vlp.data.decode): in training, everywhere, or nowhere
    fast_decode: Literal["train", "always", "never"]


@dataclass
class ValidateConfig:
    """Bounds that `vlp validate` enforces on manifests and images."""

    report_dir: str
    min_caption_chars: int
    max_caption_chars: int
    min_image_side: int
    max_image_side: int


@dataclass
class ModelConfig:
    """Architecture of the towers; `*_pretrained` load a local directory instead."""

    family: str  # a model family: a name in vlp.models.family.FAMILIES
    init_from: str | None  # a model directory or foreign checkpoint the whole model starts from
    image_tower: str  # cnn | convnext | vit | clip
    image_pretrained: str | None
    text_pretrained: str | None
    tokenizer_pretrained: str | None
    vocab_size: int
    hidden_size: int
    num_text_layers: int
    num_heads: int
    intermediate_size: int
    embed_dim: int
    # Text tokens a model reads; null: model.init_from's checkpoint's own length (a number
    # smaller than a checkpoint's cuts its texts, with a warning)
    max_text_length: int | None
    patch_size: int
    num_image_layers: int
    cnn_channels: list[int]
    # The contrastive temperature a from-scratch model (or a checkpoint without one) starts at;
    # None in the config of a saved model, whose temperature is a learned weight.
    temperature: float | None


@dataclass
class RuntimeConfig:
    """How every stage that trains or infers runs, and the shared report folders.

    None of these change what a model learns except `max_grad_norm` and `precision`
    (`local_loss`, `gradient_checkpointing` and `compile` change memory and time, not gradients
    beyond floating-point reassociation).
    """

    device: str  # auto | cpu | cuda
    precision: str  # auto | bf16 | fp16 | fp32 (fp16: CUDA only)
    num_workers: int  # DataLoader worker processes
    log_every: int  # steps between progress lines and logged training metrics
    max_grad_norm: float  # gradient clipping; <= 0 disables it
    local_loss: bool  # ITC logits [B, B_world] per process, not [B_world, B_world]
    gradient_checkpointing: bool  # recompute the towers' layers in the backward pass
    compile: bool  # torch.compile (inductor) the training step: same losses, other speed
    metrics_dir: str  # DVC metrics files (`<stage>.json`)
    plots_dir: str  # DVC plot files (CSV)


@dataclass
class PretrainConfig:
    """Pretraining loop and objective weights (a weight of 0 switches an objective off)."""

    enabled: bool  # false: no training; `model.init_from` is saved as the pretrained model
    out_dir: str
    splits: list[str]  # the pairs trained on
    # Captions (and VQA questions and answers) the tokenizer learns: the text of every stage
    # that trains, so every finetuning task shares the vocabulary.
    tokenizer_splits: list[str]
    eval_split: str | None  # zero-shot retrieval after training; None or no data: skipped
    epochs: int
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    itc_weight: float
    itm_weight: float
    lm_weight: float
    checkpoint_every: int
    # Steps of a captioning-only phase before the joint one: the LM alone, on each image's
    # first caption (0 = none). A recipe for the shapes world, where it teaches the image
    # tower what the objects are quickly; real data sets it to 0 unless it is wanted.
    caption_warmup_steps: int
    eval_batch_size: int  # zero-shot retrieval after training: images/captions per forward
    # FLIP: the fraction of a ViT/CLIP tower's patch tokens dropped per image in training
    # (none in evaluation); the last `unmasked_steps` steps train with every patch
    patch_dropout: float
    unmasked_steps: int


@dataclass
class PretrainVisionConfig:
    """Masked-autoencoder pretraining (MAE) of the ViT image tower on images alone.

    The encoder's size is `model`'s (hidden_size, num_image_layers, num_heads,
    intermediate_size, patch_size) unless `init_from` names a ViTMAE checkpoint to continue.
    """

    enabled: bool  # false: the stage trains nothing; `pretrain` builds its tower as params say
    out_dir: str
    splits: list[str]  # the images it learns from (never the evaluation split's)
    init_from: str | None  # a local ViTMAE checkpoint directory to continue from
    mask_ratio: float
    norm_pix_loss: bool  # the loss on per-patch normalised pixels (MAE's best setting)
    decoder_hidden_size: int
    decoder_num_layers: int
    decoder_num_heads: int
    decoder_intermediate_size: int
    epochs: int
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    checkpoint_every: int
    num_reconstructions: int  # fixed images shown in the reconstruction grid


@dataclass
class ProbeConfig:
    """Linear probes of frozen image encoders on the shapes world's one-object scenes."""

    train_split: str  # the classifiers learn from this split's one-object images
    eval_split: str  # and are scored on this one's
    max_iter: int  # full-batch L-BFGS iterations
    l2: float  # weight penalty (features standardised on the training split)
    batch_size: int  # images per forward pass of an encoder


@dataclass
class FinetuneConfig:
    """Per-task finetuning; `ablation` also trains each task from scratch for comparison.

    Each task's section is its own dataclass (`vlp.tasks.<task>`): a key that means nothing
    for a task is an unknown key.
    """

    init_dir: str  # the pretrained model finetuning starts from
    out_dir: str
    splits: list[str]  # what every task trains on (splits the dataset lacks are skipped)
    ablation: bool
    retrieval: RetrievalConfig
    captioning: CaptioningConfig
    vqa: VQAConfig
    generation: GenerationConfig

    def task(self, name: str) -> FinetuneBudget:
        """The params section of task `name`."""
        return getattr(self, get_task(name).name)


# Every stage's `runtime.precision` / `--precision` choices.
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")  # fp16: CUDA only

# The VQA accuracy protocols of vlp.metrics.vqa (kept here so the CLI need not import torch).
VQAProtocol = Literal["official", "lavis"]
VQA_PROTOCOLS: tuple[str, ...] = typing.get_args(VQAProtocol)


@dataclass
class EvaluateConfig:
    """Which finetuned models are scored on which data, and where results files go."""

    models_dir: str  # finetuned models, one folder per task and init
    results_dir: str
    batch_size: int
    split: str  # the manifest split every task is evaluated on
    data_root: str | None  # dataset to evaluate on; None: data.root
    num_examples: int  # qualitative examples logged per task
    vqa_protocol: VQAProtocol  # answer normalisation (vlp.metrics.vqa)
    generation_prompts: int  # test prompts generation is scored on (evenly spaced over the split)
    generation_clip_dir: str | None  # a local CLIP model directory: CLIP score; None: not scored
    # a local torchmetrics Inception weights file: the standard FID; None: the Fréchet distance
    # in the features of the pretrained image tower
    generation_inception_weights: str | None


@dataclass
class ZeroShotConfig:
    """`vlp zeroshot` and `vlp embed`: any checkpoint measured or embedded, untrained."""

    split: str  # split measured by `vlp zeroshot`
    batch_size: int  # images, texts or ITM pairs per forward pass
    rerank_k: int  # ITC candidates per query re-ranked by an ITM head (a task model: its own)
    rerank_score: RerankScore  # how re-ranked candidates are scored (a task model: its own)
    answer_max_length: int  # `--vqa`: tokens a checkpoint writes per answer at most
    answer_rank_k: int  # `--vqa --answers`: candidates ranked in full per question (BLIP's k_test)
    templates: list[str] | str  # classification prompts ("{}": the class) or a set's name
    precision: str  # auto (fp32 on CPU, bf16 on GPUs that have it) | bf16 | fp32


@dataclass
class TrackingConfig:
    """MLflow tracking; `MLFLOW_TRACKING_URI` in the environment overrides `uri`."""

    uri: str
    artifact_root: str
    experiment: str


@dataclass
class RegistryConfig:
    """Model registry names; each task's primary metric (vlp.tasks) gates its promotion."""

    name_prefix: str
    auto_promote: bool


@dataclass
class ServingConfig:
    """Request limits of the served pyfunc; recorded in the model when it is registered."""

    max_image_pixels: int  # 4096 x 4096: a 12-megapixel photo passes
    max_rows: int  # the predictors' batch size: one request, one forward batch
    max_text_chars: int  # characters per text field, checked before any tokenisation
    max_text_tokens: int  # tokens per row, counted by the model's tokenizer
    max_generation_prompts: int  # prompts per generation request (each samples several images)
    max_generation_steps: int  # sampler steps a generation request may ask for
    max_guidance_scale: float  # classifier-free guidance a generation request may ask for


@dataclass
class ScheduleConfig:
    """Prefect deployment schedule and retries of a failed stage (transient errors)."""

    cron: str
    timezone: str
    deployment: str
    retries: int
    retry_delay_s: float


@dataclass(kw_only=True)
class Config:
    """Every section of params.yaml; `profile` names the overlay it was loaded with."""

    seed: int
    runtime: RuntimeConfig
    data: DataConfig
    images: ImagesConfig
    validate: ValidateConfig
    model: ModelConfig
    pretrain_vision: PretrainVisionConfig
    pretrain: PretrainConfig
    probe: ProbeConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    zeroshot: ZeroShotConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    serving: ServingConfig
    schedule: ScheduleConfig
    # not a param: the profile `load_config` applied, a label for runs
    profile: str = field(default="default", metadata={"param": False})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none), for lineage tags.

        The profile label is not hashed: a variant's stages, which read its params.yaml
        without knowing the profile's name, hash the same as the flow that started them.
        """
        d = self.to_dict()
        d.pop("profile")
        picked = {k: d[k] for k in sections} if sections else d
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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
    if tp is float:  # finite: inf or nan would only fail later, inside a stage
        if isinstance(value, float):
            return math.isfinite(value)
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < INT_LIMIT
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if isinstance(tp, type):
        return {
            "int": "an integer",
            "float": "a finite number",
            "str": "a string",
            "bool": "true/false",
        }.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _scalar(value: Any, tp: Any, key: str) -> Any:
    """An int where a float is wanted as that float; an int past 64 bits is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if tp is float:
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: expected a finite number, got {value}") from None
    if tp is int and abs(value) >= INT_LIMIT:
        raise ConfigError(f"{key}: {value} is out of range (a 64-bit integer is needed)")
    return value


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or source}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("param", True)]
    unknown = sorted(set(raw) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{unknown[0]} in {source}")
    kwargs = {}
    for f in fields:
        name = f.name
        tp, key = hints[name], f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing key {key}")
            continue
        value = raw[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, source)
        else:
            value = _scalar(value, tp, key)
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


# One setting of a variant: the key path into params (`("pretrain", "lr")`) and its value.
Setting = tuple[tuple[str, ...], Any]


def parse_override(item: str) -> Setting:
    """`section.key=value` (the value parsed as YAML) -> (key path, value)."""
    dotted, sep, text = item.partition("=")
    if not sep or not dotted or "" in dotted.split("."):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return tuple(dotted.split(".")), value


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[Setting]:
    out: list[Setting] = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _leaves(v, (*prefix, str(k)))
        else:
            out.append(((*prefix, str(k)), v))
    return out


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return raw


def profiles_path(params: str | os.PathLike) -> Path:
    """The profiles file that belongs to a params file: `profiles.yaml` beside it."""
    return Path(params).with_name(PROFILES_FILE)


def profile_dir(profile: str) -> Path:
    """The folder a profile's runs write in, relative to the working directory."""
    return PROFILES_DIR / profile


def shapes_dir(profile: str = "default") -> Path:
    """Where `vlp generate` writes by default: `data/shapes`, in a profile's own folder."""
    if profile == "default":
        return Path(SHAPES_DIR)
    return profile_dir(profile) / SHAPES_DIR


def profile_output_settings(raw: dict[str, Any], profile: str | None) -> list[Setting]:
    """Each output folder of params (`OUTPUT_KEYS`) moved under `profile_dir(profile)`.

    `metrics` becomes `profiles/smoke/metrics`: a stage run with a profile in the workspace
    cannot overwrite the default pipeline's DVC outputs, metrics or plots. The shapes world
    moves too (`shapes_dir`), and `DATA_KEYS` naming it with it. Applied before the
    profile's own keys and `--set`, which win. No profile: nothing moves.
    """
    if not profile or profile == "default":
        return []
    settings: list[Setting] = []
    for keys in OUTPUT_KEYS + DATA_KEYS:
        section = raw.get(keys[0])
        value = section.get(keys[1]) if isinstance(section, dict) else None
        if not isinstance(value, str):  # anything else is reported when the config is built
            continue
        if keys in DATA_KEYS and Path(value) != Path(SHAPES_DIR):
            continue
        settings.append((keys, str(profile_dir(profile) / value)))
    return settings


def variant_settings(
    params: str | os.PathLike, profile: str | None = None, overrides: list[str] | None = None
) -> list[Setting]:
    """The settings a run applies over params.yaml: the profile's leaves, then `--set`s.

    Later settings win, so `--set` beats the profile. `default` (or None) is no profile.
    """
    settings: list[Setting] = []
    if profile and profile != "default":
        path = profiles_path(params)
        profiles = _read_yaml(path, "profiles file")
        if profile not in profiles:
            raise ConfigError(
                f"profile {profile!r} is not defined in {path} "
                f"(known: {', '.join(['default', *profiles])})"
            )
        overlay = profiles[profile]
        if not isinstance(overlay, dict):
            raise ConfigError(f"{path}: profile {profile!r} must be a mapping of sections")
        settings += _leaves(overlay)
    settings += [parse_override(item) for item in overrides or []]
    return settings


def apply_settings(params: dict[str, Any], settings: list[Setting]) -> None:
    """Set each (key path, value) in a params mapping, in place, creating sections as needed.

    Works on any mapping type, so a round-trip YAML document keeps its comments.
    """
    for keys, value in settings:
        node = params
        for i, part in enumerate(keys[:-1]):
            if part not in node:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{'.'.join(keys[: i + 1])} is not a section; cannot set {'.'.join(keys)}"
                )
        node[keys[-1]] = copy.deepcopy(value)


def config_from_dict(
    raw: dict[str, Any], profile: str = "default", source: str = "params"
) -> Config:
    """Build a Config from a complete params mapping; every key of every section is required."""
    for key, why in (
        ("profile", "select a profile with `--profile NAME`"),
        ("profiles", f"profiles live in {PROFILES_FILE}"),
    ):
        if key in raw:
            raise ConfigError(f"unknown key {key} in {source}: {why}")
    cfg = _build(Config, raw, "", source)
    cfg.profile = profile or "default"
    return cfg


def load_config(
    path: str | os.PathLike = DEFAULT_PARAMS,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read params.yaml, apply the named profile (profiles.yaml), then `--set` overrides.

    With a profile, the output folders move under `profiles/<name>/` first
    (`profile_output_settings`). A missing params file or key is a ConfigError:
    params.yaml is the one source of defaults.
    """
    p = Path(path)
    raw = _read_yaml(p, "params file")
    settings = variant_settings(p, profile, overrides)
    apply_settings(raw, profile_output_settings(raw, profile) + settings)
    return config_from_dict(raw, profile or "default", str(p))


def write_variant_params(
    params: str | os.PathLike,
    dest: str | os.PathLike,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Write params.yaml with a profile and `--set` overrides applied to `dest`; return its Config.

    The output folders stay as params.yaml has them: `dest` is the params of a pipeline of
    its own (a variant's worktree), whose dvc.yaml names them. The returned Config is
    `dest`'s, labelled with the profile. Checked first: a bad key raises ConfigError and
    writes nothing. The edit is a YAML round trip, so comments and layout survive, as with
    `dvc exp run --set-param`.
    """
    import io

    from ruamel.yaml import YAML

    from vlp.io import atomic_write_text

    cfg = load_config(params, profile, overrides)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long lines
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = rt.load(Path(params).read_text())
    apply_settings(doc, variant_settings(params, profile, overrides))
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(Path(dest), buf.getvalue())
    return dataclasses.replace(load_config(dest), profile=cfg.profile)


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI: `MLFLOW_TRACKING_URI` if set, else params.

    A relative SQLite path (`sqlite:///mlflow.db`) is made absolute against the working
    directory: MLflow caches one store per URI string, so a relative one would keep
    pointing at the database of the directory it was first used in.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path.cwd() / uri[len(prefix) :])
    return uri
