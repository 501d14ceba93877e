"""vlp's own text-to-image generator: a diffusers UNet conditioned on a vlp text encoder.

`UNetGenerator` implements `Generator` as Stable Diffusion does, at the shapes world's scale:

- the condition is the token states of a vlp model's text encoder (any family:
  `encode_text(ids, mask)[0]`, tokenized by `model.tokenize`, so truncated at the model's
  `max_text_length`), read by the cross-attention of a `UNet2DConditionModel` whose
  `cross_attention_dim` is their width, with the tokenizer's mask as its
  `encoder_attention_mask`; the text encoder is frozen unless `train_text_encoder`;
- the UNet denoises pixels (small images: the shapes world's 48x48) or, with `vae_from`, the
  latents of a local diffusers `AutoencoderKL` directory (kept frozen and saved with it);
- training: DDPM forward noising (`DDPMScheduler`: `train_timesteps`, `beta_schedule`,
  `prediction_type` epsilon | v_prediction) and the MSE of the prediction, as diffusers'
  examples/text_to_image/train_text_to_image.py; a `cond_dropout` fraction of rows gets the
  empty prompt's states instead of its own (classifier-free guidance);
- sampling: DDIM or DPM-Solver++ (`sampler`: ddim | dpm_solver) over `steps` trailing timesteps with guidance
  `uncond + g * (cond - uncond)` (a single conditional pass when g = 1); the initial noise of
  all images is drawn from one generator seeded with `seed`, so the images do not depend on
  how they are batched. In pixel space predictions of the clean image are clipped to [-1, 1].

A finetuned model directory is the vlp model (the text encoder, and the image tower that
re-ranks samples) plus `generator/` in diffusers' layout: `unet/` and `scheduler/`
(`save_pretrained`), `vae/` in latent space, and `vlp_generator.json`, the generator's own
settings. The UNet's layout, the schedulers and the loaders of diffusers directories are in
`vlp.tasks.generation.denoiser`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlp.errors import ConfigError
from vlp.io import atomic_dir, load_json
from vlp.tasks.generation.denoiser import (
    build_noise_scheduler,
    build_unet,
    check_settings,
    load_diffusers,
    load_noise_scheduler,
    load_vae,
    sampling_scheduler,
)

GENERATOR_DIR = "generator"  # inside a finetuned model directory
SETTINGS_FILE = "vlp_generator.json"
KIND = "unet"  # what `vlp_generator.json` says built the directory
KEY = "finetune.generation"  # the params section the build arguments come from, in messages
# what `vlp_generator.json` records: the build arguments (`vae_from` as `latent`)
SETTINGS = (
    "image_size", "block_out_channels", "layers_per_block", "attention_head_dim",
    "train_timesteps", "beta_schedule", "prediction_type", "cond_dropout", "sampler",
    "train_text_encoder", "latent",
)  # fmt: skip
SAMPLE_BATCH = 64  # images per denoising pass while sampling (twice that with guidance)


class UNetGenerator(nn.Module):
    """A `UNet2DConditionModel` denoising pixels or VAE latents, conditioned on the token states
    of a vlp model's text encoder (`Generator`).

    Build one with `build` (fresh, around a text model) or `load` (a finetuned model directory).
    """

    def __init__(
        self,
        text_model: nn.Module,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None,
        settings: dict[str, Any],
    ) -> None:
        super().__init__()
        self.text_model = text_model
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        self.settings = settings
        self.image_size: int = settings["image_size"]
        self.cond_dropout: float = settings["cond_dropout"]
        self.sampler: str = settings["sampler"]
        self.train_text_encoder: bool = settings["train_text_encoder"]
        if vae is not None:
            vae.requires_grad_(False)
        text_model.requires_grad_(False)
        if self.train_text_encoder:
            for p in _text_encoder_parameters(text_model):
                p.requires_grad_(True)
        self.train(self.training)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        text_model: nn.Module,
        *,
        image_size: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        attention_head_dim: int,
        train_timesteps: int,
        beta_schedule: str,
        prediction_type: str,
        cond_dropout: float,
        sampler: str,
        train_text_encoder: bool,
        vae_from: str | os.PathLike | None,
    ) -> UNetGenerator:
        """A fresh generator around `text_model` (a vlp model of any family); seed torch first.

        `attention_head_dim` is the width of one attention head (every block's channels must be
        a multiple of it); `vae_from`: a local diffusers `AutoencoderKL` directory whose latent
        space the UNet denoises, or None for pixel space. ConfigError naming the
        `finetune.generation` key of a bad value.
        """
        settings = {
            "kind": KIND,
            "image_size": int(image_size),
            "block_out_channels": [int(c) for c in block_out_channels],
            "layers_per_block": int(layers_per_block),
            "attention_head_dim": int(attention_head_dim),
            "train_timesteps": int(train_timesteps),
            "beta_schedule": beta_schedule,
            "prediction_type": prediction_type,
            "cond_dropout": float(cond_dropout),
            "sampler": sampler,
            "train_text_encoder": bool(train_text_encoder),
            "latent": vae_from is not None,
        }
        check_settings(settings, KEY)
        vae = None if vae_from is None else load_vae(vae_from, f"{KEY}.vae_from")
        unet = build_unet(settings, _text_width(text_model), vae, KEY)
        noise_scheduler = build_noise_scheduler(settings, latent=vae is not None)
        device = next(text_model.parameters()).device
        return cls(text_model, unet.to(device), noise_scheduler, _to(vae, device), settings)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        text_model: nn.Module | None = None,
    ) -> UNetGenerator:
        """The generator a finetuned model directory holds (`save`), on `device`.

        `text_model`: the directory's vlp model when the caller has loaded it already (a
        predictor re-ranks with it); else it is loaded here. ConfigError naming what is missing
        or unreadable.
        """
        root = Path(model_dir)
        gen_dir = root / GENERATOR_DIR
        settings = load_json(gen_dir / SETTINGS_FILE, ConfigError)
        if not isinstance(settings, dict) or settings.get("kind") != KIND:
            raise ConfigError(f"{gen_dir / SETTINGS_FILE}: not the settings of a vlp generator")
        missing = [k for k in SETTINGS if k not in settings]
        if missing:
            raise ConfigError(f"{gen_dir / SETTINGS_FILE}: lacks {', '.join(missing)}")
        check_settings(settings, f"{gen_dir / SETTINGS_FILE}: settings")
        if text_model is None:
            from vlp.models.family import load_model

            text_model = load_model(root, device=device).model
        unet = load_diffusers(UNet2DConditionModel, gen_dir / "unet", str(gen_dir / "unet"))
        scheduler = load_noise_scheduler(gen_dir / "scheduler")
        vae = load_vae(gen_dir / "vae", str(gen_dir / "vae")) if settings["latent"] else None
        gen = cls(text_model, unet.to(device), scheduler, _to(vae, device), settings)
        return gen.eval()

    def save(self, model_dir: Path) -> None:
        """Write the vlp model (replacing `model_dir`), then `generator/` inside it."""
        self.text_model.save_pretrained(model_dir)
        with atomic_dir(Path(model_dir) / GENERATOR_DIR, "generator") as tmp:
            self.unet.save_pretrained(tmp / "unet")
            self.noise_scheduler.save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae")
            text = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
            (tmp / SETTINGS_FILE).write_text(text)

    def train(self, mode: bool = True) -> UNetGenerator:
        """Train or eval mode; a frozen text encoder and the VAE always stay in eval mode."""
        super().train(mode)
        if not self.train_text_encoder:
            self.text_model.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet's parameters, and with `train_text_encoder` those of the text encoder (the
        ones its token states depend on); the same set as `requires_grad`."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ condition
    def encode_prompts(
        self, prompts: Sequence[str], drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states [B, T, H], attention mask [B, T]) of `prompts`.

        Rows where the boolean `drop` [B] holds get the empty prompt's states and mask instead
        (padded with zero states that the mask hides).
        """
        states, mask = self._encode(list(prompts))
        if drop is None or not bool(drop.any()):
            return states, mask
        empty, empty_mask = self._encode([""])
        length = max(states.shape[1], empty.shape[1])
        states, mask = _pad(states, mask, length)
        empty, empty_mask = _pad(empty, empty_mask, length)
        drop = drop.to(states.device)
        states = torch.where(drop[:, None, None], empty.to(states.dtype), states)
        return states, torch.where(drop[:, None], empty_mask, mask)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.text_model.tokenize(prompts)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            states = self.text_model.encode_text(enc["input_ids"], enc["attention_mask"])[0]
        return states, enc["attention_mask"]

    # ------------------------------------------------------------------ training
    def training_loss(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The denoising MSE of one batch of images [B, 3, S, S] in [-1, 1] and their prompts.

        Random timesteps, noise and condition dropout come from torch's global RNG.
        """
        clean = self._to_latents(pixel_values.to(self.device))
        batch = clean.shape[0]
        drop = torch.rand(batch) < self.cond_dropout
        states, mask = self.encode_prompts(prompts, drop)
        noise = torch.randn_like(clean)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), device=clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(clean, noise, t)
        else:
            target = noise
        with self._attention():
            pred = self.unet(noisy, t, states, encoder_attention_mask=mask).sample
        return F.mse_loss(pred.float(), target.float())

    def _attention(self) -> AbstractContextManager[Any]:
        """The attention kernel: on CPU plain softmax attention, whose backward takes a
        fraction of the time of the flash kernel's for these short text keys (2 s of a 6 s
        training step at 48 px, measured)."""
        if self.device.type == "cpu":
            return sdpa_kernel([SDPBackend.MATH])
        return nullcontext()

    def _to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixels
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample()
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> list[list[Image.Image]]:
        """`num_images_per_prompt` images for each prompt (`steps` sampler steps, guidance
        `guidance_scale`), the same for the same `seed` whatever the batching."""
        if not prompts:
            return []
        was_training = self.training
        self.eval()
        try:
            images = self._sample_tensors(
                list(prompts), num_images_per_prompt, steps, guidance_scale, seed
            )
        finally:
            self.train(was_training)
        pil = [Image.fromarray(a) for a in _to_uint8(images)]
        k = num_images_per_prompt
        return [pil[i * k : (i + 1) * k] for i in range(len(prompts))]

    def _sample_tensors(
        self, prompts: list[str], k: int, steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """Images [P*k, 3, S, S] in [-1, 1], prompt-major."""
        cfg = self.unet.config
        size = cfg.sample_size
        rng = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((len(prompts) * k, cfg.in_channels, size, size), generator=rng)
        cond, cond_mask = self.encode_prompts(prompts)
        cond, cond_mask = cond.repeat_interleave(k, 0), cond_mask.repeat_interleave(k, 0)
        uncond = self.encode_prompts([""]) if guidance_scale != 1 else None
        out = []
        for start in range(0, noise.shape[0], SAMPLE_BATCH):
            rows = slice(start, start + SAMPLE_BATCH)
            scheduler = sampling_scheduler(
                self.noise_scheduler, self.sampler, steps, self.vae is None, self.device
            )
            x = noise[rows].to(self.device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t)
                with self._attention():
                    pred = self._guided(
                        x_in, t, cond[rows], cond_mask[rows], uncond, guidance_scale
                    )
                x = scheduler.step(pred, t, x).prev_sample
            out.append(self._decode(x))
        return torch.cat(out)

    def _guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The guided prediction `uncond + g * (cond - uncond)`; the conditional one if g = 1."""
        if uncond is None:
            return self.unet(x, t, cond, encoder_attention_mask=cond_mask).sample.float()
        length = max(cond.shape[1], uncond[0].shape[1])
        cond, cond_mask = _pad(cond, cond_mask, length)
        empty, empty_mask = _pad(*uncond, length)
        n = x.shape[0]
        states = torch.cat([empty.expand(n, -1, -1).to(cond.dtype), cond])
        mask = torch.cat([empty_mask.expand(n, -1), cond_mask])
        pred = self.unet(torch.cat([x, x]), t, states, encoder_attention_mask=mask).sample
        u, c = pred.float().chunk(2)
        return u + guidance_scale * (c - u)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.vae is None:
            return x.clamp(-1, 1)
        latents = x / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)


# ---------------------------------------------------------------------- helpers of the class
def _text_width(text_model: nn.Module) -> int:
    """The width H of the text model's token states (the UNet's cross_attention_dim)."""
    enc = text_model.tokenize([""])
    with torch.no_grad():
        return int(text_model.encode_text(enc["input_ids"], enc["attention_mask"])[0].shape[-1])


def _text_encoder_parameters(text_model: nn.Module) -> list[nn.Parameter]:
    """The parameters of `text_model` its token states depend on (a gradient probe on the empty
    prompt): its text encoder, without the image tower, heads or decoder."""
    params = list(text_model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = text_model.training
    text_model.eval().requires_grad_(True)
    text_model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            enc = text_model.tokenize(["a"])
            states = text_model.encode_text(enc["input_ids"], enc["attention_mask"])[0]
            states.float().sum().backward()
        return [p for p in params if p.grad is not None]
    finally:
        text_model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        text_model.train(was_training)


def _pad(
    states: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """States [B, T, H] and mask [B, T] right-padded to `length` tokens (zeros, masked out)."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    return F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[N, 3, S, S] in [-1, 1] -> N uint8 arrays [S, S, 3]."""
    arr = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return list(arr.permute(0, 2, 3, 1).cpu().numpy())


def _to(module: nn.Module | None, device: str | torch.device) -> Any:
    return None if module is None else module.to(device)
