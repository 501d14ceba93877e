"""Activation (gradient) checkpointing of the towers: recompute layers in the backward pass.

Each transformer layer (ViT, CLIP vision, BLIP text encoder and decoder) and each ConvNeXt
stage keeps only its input during the forward pass and recomputes its activations when the
backward pass needs them: activation memory drops to about one layer's, for roughly one
extra forward pass of compute. Gradients are unchanged (dropout replays the same masks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CHECKPOINT = partial(checkpoint, use_reentrant=False)


def _checkpoint_stages(stages: nn.ModuleList) -> None:
    """Run each stage's forward under torch.utils.checkpoint while training with gradients."""
    for stage in stages:
        if getattr(stage, "_vlp_checkpointed", False):
            continue  # a second training phase on the same model
        stage._vlp_checkpointed = True
        forward: Callable[..., Any] = stage.forward

        def checkpointed(*args: Any, _forward=forward, _stage=stage, **kwargs: Any) -> Any:
            if _stage.training and torch.is_grad_enabled():
                return _CHECKPOINT(_forward, *args, **kwargs)
            return _forward(*args, **kwargs)

        stage.forward = checkpointed


def enable_activation_checkpointing(module: nn.Module) -> list[str]:
    """Checkpoint every transformers model inside `module`; returns the names it applied to.

    Transformer layers use transformers' own mechanism (`GradientCheckpointingLayer`);
    ConvNeXt stages are wrapped in `torch.utils.checkpoint`. A ResNet backbone (the `cnn`
    tower) is left as it is, with a warning: recomputing its BatchNorm layers in training
    mode would update their running statistics twice per step.
    """
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    applied: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        if any(done == "" or name.startswith(f"{done}.") for done in applied):
            continue  # inside a model already handled (e.g. the decoder's `bert`)
        model_type = getattr(sub.config, "model_type", "")
        if any(isinstance(m, GradientCheckpointingLayer) for m in sub.modules()):
            # BLIP's text models have checkpointable layers but do not declare
            # `supports_gradient_checkpointing`, so `activation_checkpointing_enable` refuses
            # them; setting the layers' flag is what that method does for the others.
            sub._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_CHECKPOINT)
        elif model_type == "convnext":
            _checkpoint_stages(sub.encoder.stages)
        else:
            why = (
                "its BatchNorm running statistics would be updated twice"
                if model_type == "resnet"
                else "it has no checkpointable layers"
            )
            warnings.warn(
                f"gradient_checkpointing: {name or 'the model'} ({type(sub).__name__}) is not "
                f"checkpointed ({why}); its activations are kept",
                stacklevel=2,
            )
            continue
        applied.append(name)
    return applied
