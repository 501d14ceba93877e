"""Patch dropout (FLIP, Li et al. 2023; open_clip's `patch_dropout`): a tower whose
`patch_dropout` is > 0 and that is in training mode keeps `kept_patches(N, p)` of its N patch
tokens per image, drawn independently per image from torch's RNG, after the patch and position
embeddings and before the transformer layers; the CLS token is always kept. The layers then
see fewer tokens, which is where the speed comes from, and so does whatever reads the tower's
tokens (ITM, LM). In eval mode, or at 0, the tower runs the transformers model's own forward
unchanged. The training loop sets the rate per step (`set_patch_dropout`); a model is built
and loaded with 0.
"""

from __future__ import annotations

import torch
from torch import nn

from vlp.errors import ConfigError


def kept_patches(num_patches: int, rate: float) -> int:
    """Patch tokens that patch dropout at `rate` keeps of `num_patches`: N - round(rate * N), >= 1.

    `round` is Python's (halves to even): 0.5 of 9 patches drops 4 and keeps 5.
    """
    return max(1, num_patches - round(rate * num_patches))


def drop_patches(tokens: torch.Tensor, rate: float) -> torch.Tensor:
    """[B, 1 + N, W] embedded tokens -> [B, 1 + K, W]: the CLS token and K random patches each.

    K = `kept_patches(N, rate)`; each image draws its own patches from torch's RNG (on the
    tokens' device), kept in their original order.
    """
    b, n = tokens.shape[0], tokens.shape[1] - 1
    keep = torch.rand(b, n, device=tokens.device).topk(kept_patches(n, rate), dim=1).indices
    keep = keep.sort(dim=1).values + 1  # + 1: past the CLS token
    index = torch.cat([keep.new_zeros(b, 1), keep], dim=1)
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def vit_tokens(vit: nn.Module, pixel_values: torch.Tensor, rate: float) -> torch.Tensor:
    """ViTModel's last_hidden_state with patch dropout at `rate` after its embeddings."""
    # ViTModel.forward's own steps: cast to the weights' dtype, embed, layers, layernorm
    pixel_values = pixel_values.to(vit.embeddings.patch_embeddings.projection.weight.dtype)
    hidden = drop_patches(vit.embeddings(pixel_values, interpolate_pos_encoding=True), rate)
    for layer in vit.layers:
        hidden = layer(hidden, None)
    return vit.layernorm(hidden)


def clip_vision_tokens(clip: nn.Module, pixel_values: torch.Tensor, rate: float) -> torch.Tensor:
    """CLIPVisionModel's last_hidden_state (no post_layernorm) with patch dropout at `rate`."""
    hidden = drop_patches(clip.embeddings(pixel_values, interpolate_pos_encoding=True), rate)
    return clip.encoder(inputs_embeds=clip.pre_layrnorm(hidden)).last_hidden_state


def set_patch_dropout(model: nn.Module, rate: float) -> int:
    """Set the training-time patch dropout of every image tower in `model`; how many were set.

    Towers without patches (CNN) are refused at a rate > 0 (ConfigError).
    """
    towers = [m for m in model.modules() if hasattr(m, "has_patches")]
    for tower in towers:
        if rate > 0 and not tower.has_patches:
            raise ConfigError(
                f"patch dropout {rate}: the {type(tower).__name__} image tower has no patch tokens"
            )
        tower.patch_dropout = rate
    return len(towers)
