"""A user's own diffusers text-to-image pipeline as a `Generator` (`DiffusersPipelineGenerator`).

The pipeline is a local directory written by diffusers' `save_pretrained` (a Stable Diffusion
1.x/2.x-style checkpoint: `model_index.json` naming a `unet`, `vae`, `text_encoder`,
`tokenizer` and `scheduler`); nothing is downloaded. Finetuning follows diffusers'
text-to-image training examples: images become VAE latents scaled by the VAE's
`scaling_factor`, noised at uniform random timesteps by a `DDPMScheduler` built from the
pipeline's scheduler config, and the UNet regresses the noise (or the velocity, per the
scheduler's `prediction_type`) given the frozen text encoder's states of the prompt. Either
the whole UNet trains (`lora_rank` 0) or rank-`lora_rank` LoRA adapters on its attention
projections do (peft), its base weights frozen. Trained weights stay in float32 while the
frozen parts may run in a lower precision (`dtype`, under autocast), as the examples do.

A saved generator is a self-contained pipeline directory that plain diffusers loads too:
the whole pipeline (`save_pretrained`), or with LoRA the base pipeline plus the adapters
in diffusers' LoRA format (`LORA_WEIGHTS`, read by `load_lora_weights`), and `SETTINGS_FILE`
recording how it trains and samples. Its scheduler is the sampler it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlp.errors import ConfigError
from vlp.io import atomic_dir, load_json

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

SETTINGS_FILE = "diffusers_generator.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' own LoRA file name
KIND = "diffusers-pipeline"
# The params section whose keys the constructor's arguments are (named in errors).
SECTION = "finetune.generation"
# What a text-to-image pipeline directory must name in its model_index.json.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SAMPLERS = {"ddim": "DDIMScheduler", "dpm_solver": "DPMSolverMultistepScheduler"}
# The UNet's attention projections, as diffusers' LoRA training examples adapt them.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
ADAPTER = "default"


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """How a pipeline generator trains and samples: `SECTION`'s keys, recorded when saved."""

    lora_rank: int  # 0: the whole UNet trains; >0: LoRA adapters of this rank
    lora_alpha: int  # LoRA scaling numerator (scale = lora_alpha / lora_rank)
    cond_dropout: float  # fraction of training rows whose prompt becomes ""
    sampler: str  # a SAMPLERS key
    image_size: int  # side of the square images trained on and sampled


def check_settings(settings: PipelineSettings) -> None:
    """ConfigError naming the `SECTION` key whose value no pipeline generator accepts."""
    s = settings
    problems = [
        (s.lora_rank < 0, "lora_rank", "must be 0 (whole UNet) or a positive LoRA rank"),
        (s.lora_rank > 0 and s.lora_alpha <= 0, "lora_alpha", "must be positive"),
        (not 0 <= s.cond_dropout < 1, "cond_dropout", "must be in [0, 1)"),
        (s.sampler not in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}"),
        (s.image_size <= 0, "image_size", "must be positive"),
    ]
    for bad, key, why in problems:
        if bad:
            raise ConfigError(f"{SECTION}.{key}: {getattr(s, key)!r} {why}")


def check_pipeline_dir(path: Path) -> dict[str, Any]:
    """The model_index.json of a text-to-image pipeline directory; ConfigError naming the
    directory and what it lacks otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{path}: not a directory; a diffusers text-to-image pipeline directory "
            "(written by save_pretrained) is expected"
        )
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    index = load_json(path / "model_index.json", ConfigError)
    if not isinstance(index, dict):
        raise ConfigError(f"{path / 'model_index.json'}: not a JSON object")
    missing = [c for c in COMPONENTS if not _named(index.get(c))]
    if missing:
        raise ConfigError(
            f"{path}: not a text-to-image pipeline: its model_index.json names no "
            f"{', '.join(missing)} (a Stable Diffusion-style pipeline has {', '.join(COMPONENTS)})"
        )
    return index


def _named(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def read_pipeline(path: Path) -> StableDiffusionPipeline:
    """The pipeline saved in `path`, from local files only, in its stored precision;
    ConfigError naming `path` if it is not a Stable Diffusion-style text-to-image pipeline."""
    from diffusers import StableDiffusionPipeline

    check_pipeline_dir(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot load as a diffusers text-to-image pipeline ({e})") from e
    for name in COMPONENTS:
        if getattr(pipe, name, None) is None:
            raise ConfigError(f"{path}: the pipeline loaded without its {name}")
    added = pipe.unet.config.get("addition_embed_type")
    if added is not None:
        raise ConfigError(
            f"{path}: its UNet takes added conditioning ({added!r}, as SDXL's does); only "
            "pipelines conditioned on one text encoder's states (Stable Diffusion 1.x/2.x) are "
            "supported"
        )
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"{path / 'scheduler'}: prediction_type {prediction!r}; only 'epsilon' and "
            "'v_prediction' pipelines can be finetuned"
        )
    return pipe


class DiffusersPipelineGenerator:
    """A local diffusers text-to-image pipeline, finetuned in full or with LoRA (`Generator`).

    Build one from a user's pipeline directory with `from_directory`, from a directory
    written by `save` with `load`, or from an already loaded pipeline with the constructor.
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        lora_rank: int,
        lora_alpha: int,
        cond_dropout: float,
        sampler: str,
        image_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        from diffusers import DDPMScheduler

        self.settings = PipelineSettings(lora_rank, lora_alpha, cond_dropout, sampler, image_size)
        check_settings(self.settings)
        multiple = pipeline.vae_scale_factor
        if image_size % multiple:
            raise ConfigError(
                f"{SECTION}.image_size: {image_size} is not a multiple of {multiple}, the "
                "pipeline's VAE downsampling factor"
            )
        self.image_size = image_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipeline = pipeline
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        pipeline.scheduler = _sampler_scheduler(sampler, pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        self._place_weights()

    def _place_weights(self) -> None:
        """Freeze all but what trains; frozen parts in `dtype`, trained weights in float32."""
        pipe, full = self.pipeline, self.settings.lora_rank == 0
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                trained = full and name == "unet"
                _place(module, self.device, torch.float32 if trained else self.dtype)
        unet = pipe.unet
        if full:
            unet.requires_grad_(True)
            return
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=self.settings.lora_rank,
                lora_alpha=self.settings.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            ),
            adapter_name=ADAPTER,
        )
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(self.device, torch.float32)
                p.requires_grad_(True)

    @classmethod
    def from_directory(
        cls,
        path: Path,
        *,
        lora_rank: int,
        lora_alpha: int,
        cond_dropout: float,
        sampler: str,
        image_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> DiffusersPipelineGenerator:
        """The generator over the user's pipeline directory `path` (fresh adapters if LoRA)."""
        return cls(
            read_pipeline(path),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            cond_dropout=cond_dropout,
            sampler=sampler,
            image_size=image_size,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def load(
        cls, model_dir: Path, *, device: torch.device | str, dtype: torch.dtype
    ) -> DiffusersPipelineGenerator:
        """The generator `save` wrote into `model_dir` (same weights, settings and sampler)."""
        model_dir = Path(model_dir)
        recorded = load_json(model_dir / SETTINGS_FILE, ConfigError)
        if not isinstance(recorded, dict) or recorded.get("generator") != KIND:
            raise ConfigError(f"{model_dir / SETTINGS_FILE}: not a saved {KIND} generator")
        fields = [f.name for f in dataclasses.fields(PipelineSettings)]
        missing = [f for f in fields if f not in recorded]
        if missing:
            raise ConfigError(f"{model_dir / SETTINGS_FILE}: no {', '.join(missing)}")
        settings = {f: recorded[f] for f in fields}
        generator = cls(read_pipeline(model_dir), **settings, device=device, dtype=dtype)
        if generator.settings.lora_rank:
            generator._load_adapter(model_dir / LORA_WEIGHTS)
        return generator

    def _load_adapter(self, weights: Path) -> None:
        """Copy saved LoRA weights (diffusers' format) into this generator's adapters."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        if not weights.is_file():
            raise ConfigError(f"{weights}: file not found (the LoRA adapters of this model)")
        state = type(self.pipeline).lora_state_dict(weights.parent, weight_name=weights.name)[0]
        prefix = f"{self.pipeline.unet_name}."
        unet_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(
            self.pipeline.unet, convert_unet_state_dict_to_peft(unet_state), ADAPTER
        )
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if unexpected or missing:
            raise ConfigError(
                f"{weights}: its LoRA weights do not fit adapters of the recorded "
                f"lora_rank {self.settings.lora_rank} (unexpected: {unexpected[:3]}, "
                f"missing: {missing[:3]})"
            )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)

    def training_loss(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Noise- (or velocity-) prediction MSE of one batch in the VAE's latent space.

        `pixel_values` [B, 3, image_size, image_size] in [-1, 1]. Timesteps, noise, latent
        samples and which prompts are dropped come from torch's global generators.
        """
        pipe, sched = self.pipeline, self.noise_scheduler
        if len(prompts) != pixel_values.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {pixel_values.shape[0]} images")
        drop = (torch.rand(len(prompts)) < self.settings.cond_dropout).tolist()
        prompts = ["" if d else p for p, d in zip(prompts, drop, strict=True)]
        pipe.unet.train()
        with torch.no_grad(), self._autocast():
            pixels = pixel_values.to(self.device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.sample().float()
            latents = latents * pipe.vae.config.scaling_factor
            states = self._prompt_states(prompts)
        noise = torch.randn_like(latents)
        steps = sched.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = sched.add_noise(latents, noise, t)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        with self._autocast():
            pred = pipe.unet(noisy.to(pipe.unet.dtype), t, states).sample
        return F.mse_loss(pred.float(), target.float())

    def _prompt_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's states of `prompts`, as the pipeline conditions on them."""
        states, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False)
        return states

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The whole UNet's parameters (`lora_rank` 0) or its LoRA adapters'."""
        return [p for p in self.pipeline.unet.parameters() if p.requires_grad]

    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> list[list[Image.Image]]:
        """The pipeline's own sampling with the chosen sampler, grouped per prompt.

        The initial noise comes from a CPU generator seeded with `seed`, so a seed gives the
        same noise on any device.
        """
        pipe = self.pipeline
        was_training = pipe.unet.training
        pipe.unet.eval()
        try:
            with self._autocast():
                images = pipe(
                    list(prompts),
                    height=self.image_size,
                    width=self.image_size,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    num_images_per_prompt=num_images_per_prompt,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pil",
                ).images
        finally:
            pipe.unet.train(was_training)
        n = num_images_per_prompt
        return [images[i * n : (i + 1) * n] for i in range(len(prompts))]

    def save(self, model_dir: Path) -> None:
        """Write a self-contained pipeline directory to `model_dir`, atomically: the whole
        pipeline, or the base pipeline plus `LORA_WEIGHTS`; and `SETTINGS_FILE`."""
        with atomic_dir(Path(model_dir), "model") as tmp:
            if self.settings.lora_rank == 0:
                self.pipeline.save_pretrained(tmp)
            else:
                with _base_unet_in(self.pipeline):
                    self.pipeline.save_pretrained(tmp)
                self._save_adapter(tmp)
            _make_reproducible(tmp)
            recorded = {"generator": KIND, **dataclasses.asdict(self.settings)}
            text = json.dumps(recorded, indent=2, sort_keys=True) + "\n"
            (tmp / SETTINGS_FILE).write_text(text)

    def _save_adapter(self, directory: Path) -> None:
        """The UNet's LoRA adapters in diffusers' format, with their peft config as metadata
        (so that `lora_alpha` survives and `load_lora_weights` rebuilds the same adapters)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self.pipeline.unet
        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        type(self.pipeline).save_lora_weights(
            directory,
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            weight_name=LORA_WEIGHTS,
            unet_lora_adapter_metadata={
                k: sorted(v) if isinstance(v, set) else v  # a set's order varies per process
                for k, v in unet.peft_config[ADAPTER].to_dict().items()
            },
        )


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `module` to `device`; cast its floating weights to `dtype` only where they differ
    (diffusers warns at every cast, needed or not)."""
    module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)


def _sampler_scheduler(sampler: str, config: Any) -> Any:
    """The sampling scheduler named `sampler`, built from the pipeline's scheduler config."""
    import diffusers

    scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(config)
    if scheduler.config.get("clip_sample"):
        # Latents are not images: a config that leaves DDIM's clipping on (by naming none)
        # gets it off, as StableDiffusionPipeline itself corrects a scheduler it loads.
        scheduler = type(scheduler).from_config(config, clip_sample=False)
    return scheduler


@contextmanager
def _base_unet_in(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """Swap in, for the block, a UNet without LoRA layers that shares the frozen base
    weights (no copy), so that `save_pretrained` writes the base pipeline."""
    peft_unet = pipe.unet
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in peft_unet.state_dict().items()
        if "lora_" not in k
    }
    with torch.device("meta"):
        base = type(peft_unet).from_config(peft_unet.config)
    base.load_state_dict(state, strict=True, assign=True)
    pipe.unet = base
    try:
        yield
    finally:
        pipe.unet = peft_unet


def _make_reproducible(directory: Path) -> None:
    """Make the bytes of a saved pipeline depend on its contents alone: configs lose the
    path each component was read from (`_name_or_path`), safetensors files get a sorted
    header and ordinary file modes (`canonical_safetensors`)."""
    from vlp.models.weights import canonical_safetensors

    for path in sorted(directory.rglob("*")):
        if path.suffix == ".safetensors":
            canonical_safetensors(path)
        elif path.suffix == ".json":
            content = json.loads(path.read_text())
            if isinstance(content, dict) and "_name_or_path" in content:
                del content["_name_or_path"]
                path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
