"""What every text-to-image generator of the generation task does (`Generator`).

Two kinds implement it, both on diffusers: vlp's own (a `UNet2DConditionModel` conditioned
on a pretrained vlp model's text token states, `encode_text(...)[0]`, in pixel space or in an
`AutoencoderKL`'s latent space) and a user's local diffusers text-to-image pipeline directory
(e.g. a Stable Diffusion checkpoint saved with `save_pretrained`), trained in full or with
LoRA adapters (peft). Finetuning, evaluation, re-ranking and serving only use this protocol.

Images cross it as float tensors [B, 3, H, W] in [-1, 1] (training) and as PIL RGB images
(sampling). Prompts cross it as strings: each generator tokenizes with its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image


class Generator(Protocol):
    """A text-conditioned diffusion generator: a training loss, a sampler, a directory."""

    image_size: int  # side of the square images it generates

    def training_loss(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The denoising loss of one batch (random timesteps and noise; the condition dropped
        for the classifier-free-guidance fraction of rows)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What finetuning updates (the denoiser, its LoRA adapters, or the text encoder too)."""
        ...

    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_images_per_prompt: int,
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> list[list[Image.Image]]:
        """`num_images_per_prompt` images for each prompt, deterministic in `seed`."""
        ...

    def save(self, model_dir: Path) -> None:
        """Write what `load` needs into a model directory being assembled."""
        ...
