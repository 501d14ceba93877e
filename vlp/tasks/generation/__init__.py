"""Text-to-image generation: a diffusion generator conditioned on a pretrained text encoder."""
