"""The generator's denoiser, noise schedules and VAE: built from its settings, or loaded from
local diffusers directories (safetensors only, never a hub name).

`check_settings` checks the settings `UNetGenerator.build` takes (its `finetune.generation`
params); `build_unet` lays the `UNet2DConditionModel` out; `build_noise_scheduler` is the
training noise (DDPM) and `sampling_scheduler` the fast sampler made from it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)

from vlp.errors import ConfigError
from vlp.models.weights import check_safetensors

SAMPLERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def check_settings(s: dict[str, Any], where: str) -> None:
    """ConfigError naming `where.<key>` of the first bad setting."""
    choices = {
        "sampler": tuple(SAMPLERS),
        "prediction_type": PREDICTION_TYPES,
        "beta_schedule": BETA_SCHEDULES,
    }
    for key, allowed in choices.items():
        if s.get(key) not in allowed:
            raise ConfigError(f"{where}.{key}: {s.get(key)!r} is not one of {', '.join(allowed)}")
    if not 0 <= s["cond_dropout"] < 1:
        raise ConfigError(f"{where}.cond_dropout: must be in [0, 1), got {s['cond_dropout']}")
    channels, head = s["block_out_channels"], s["attention_head_dim"]
    if not channels or head <= 0 or any(c <= 0 or c % head for c in channels):
        raise ConfigError(
            f"{where}.block_out_channels: {channels} must be positive multiples of "
            f"attention_head_dim ({head})"
        )
    for key in ("image_size", "layers_per_block", "train_timesteps"):
        if s[key] <= 0:
            raise ConfigError(f"{where}.{key}: must be > 0, got {s[key]}")


def build_unet(
    s: dict[str, Any], cross_attention_dim: int, vae: AutoencoderKL | None, where: str
) -> UNet2DConditionModel:
    """A fresh UNet: no attention at full resolution; in the blocks between, cross-attention to
    the text only (self-attention over their thousands of positions costs the most, on CPU
    most of a training step); self- and cross-attention at the lowest resolution and in the
    middle block, where the scene's layout is a few positions."""
    channels = s["block_out_channels"]
    size, in_channels = s["image_size"], 3
    if vae is not None:
        size //= 2 ** (len(vae.config.block_out_channels) - 1)
        in_channels = vae.config.latent_channels
    factor = 2 ** (len(channels) - 1)
    if size % factor:
        space = "latent" if vae is not None else "image"
        raise ConfigError(
            f"{where}.block_out_channels: {len(channels)} blocks halve the {space} side "
            f"{len(channels) - 1} times, which {size} does not allow (image_size "
            f"{s['image_size']}); use fewer blocks or another image_size"
        )
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(channels),
        layers_per_block=s["layers_per_block"],
        # diffusers' `attention_head_dim` is the number of heads (its legacy naming)
        attention_head_dim=tuple(c // s["attention_head_dim"] for c in channels),
        cross_attention_dim=cross_attention_dim,
        only_cross_attention=tuple(i < n - 1 for i in range(n)),
        mid_block_only_cross_attention=False,
        norm_num_groups=math.gcd(32, *channels),
    )


def build_noise_scheduler(s: dict[str, Any], latent: bool) -> DDPMScheduler:
    """The training noise: DDPM forward noising with the settings' schedule and target."""
    return DDPMScheduler(
        num_train_timesteps=s["train_timesteps"],
        beta_schedule=s["beta_schedule"],
        prediction_type=s["prediction_type"],
        clip_sample=not latent,  # sampling clips predicted clean pixels, never latents
    )


def sampling_scheduler(
    noise: DDPMScheduler, sampler: str, steps: int, pixels: bool, device: torch.device
) -> Any:
    """A fresh `sampler` (DPM-Solver keeps state across steps) of the training noise schedule,
    set to `steps` trailing timesteps (the first at the last training timestep)."""
    options: dict[str, Any] = {"timestep_spacing": "trailing"}
    if sampler == "dpm_solver":
        # clip predicted clean pixels as DDIM's clip_sample does (thresholding at 1.0)
        options |= {"thresholding": pixels, "sample_max_value": 1.0}
    sampler_cls = SAMPLERS[sampler]
    known = inspect.signature(sampler_cls.__init__).parameters
    config = {k: v for k, v in dict(noise.config).items() if k in known}
    scheduler = sampler_cls.from_config(config | options)
    scheduler.set_timesteps(int(steps), device=device)
    return scheduler


def load_diffusers(model_class: Any, p: Path, key: str) -> Any:
    """`from_pretrained` of a local diffusers model directory (safetensors only), in fp32."""
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {p} is not a diffusers model directory (no config.json)")
    try:
        name = json.loads((p / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot read {p / 'config.json'}: {e}") from None
    if name != model_class.__name__:
        raise ConfigError(f"{key}: {p} holds a {name!r}, not a diffusers {model_class.__name__}")
    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f)
    try:
        return model_class.from_pretrained(
            str(p), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(
            f"{key}: cannot load a {model_class.__name__} from {p}: {message}"
        ) from None


def load_vae(path: str | os.PathLike, key: str) -> AutoencoderKL:
    """The frozen `AutoencoderKL` of the local diffusers directory `path`; ConfigError naming
    `key` and the path if it is not one."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"{key}: {str(path)!r} is not a local directory (a diffusers AutoencoderKL saved with "
            "save_pretrained; hub names are never downloaded)"
        )
    return load_diffusers(AutoencoderKL, p, key).eval()


def load_noise_scheduler(p: Path) -> DDPMScheduler:
    """The training noise schedule saved in `p` (`save_pretrained`)."""
    config = p / DDPMScheduler.config_name
    if not config.is_file():
        raise ConfigError(f"{config}: not found; not a vlp generator directory")
    try:
        return DDPMScheduler.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot load the noise scheduler: {e}") from None
