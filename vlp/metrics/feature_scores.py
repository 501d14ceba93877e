"""Generation metrics computed from a network's features: CLIP score, ITC score, Fréchet distance.

`vlp.metrics.generation` describes each; it loads this module (torch, torchmetrics) only when
a model, CLIP directory or Inception weights are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlp.errors import ConfigError, ResultsError

__all__ = [
    "INCEPTION",
    "ImageTowerFeatures",
    "clip_score",
    "frechet_distance",
    "inception_features",
    "itc_score",
    "model_score_fn",
]

INCEPTION = "inception-v3-2048"  # `fid_features` of the standard FID


# ---------------------------------------------------------------- text-image agreement


def _batches(n: int, batch_size: int | None) -> list[slice]:
    step = batch_size or max(n, 1)
    return [slice(s, s + step) for s in range(0, n, step)]


def _uint8(image: Image.Image, side: int | None = None) -> torch.Tensor:
    """An image as a uint8 tensor [3, H, W], resized (bicubic) to side x side if given."""
    img = image.convert("RGB")
    if side is not None and img.size != (side, side):
        img = img.resize((side, side), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _check_pairs(images: Sequence[Any], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts) or not images:
        raise ValueError(
            f"need as many images as prompts, at least one: {len(images)}, {len(prompts)}"
        )


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose feature methods return the projected embeddings as tensors, as
    torchmetrics' CLIPScore expects; transformers 5 returns them as a model output's
    `pooler_output` (Lightning-AI/torchmetrics#3428)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def clip_score(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    clip_dir: Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
) -> float:
    """torchmetrics' CLIPScore of each image with its prompt, with the CLIP model in `clip_dir`
    (a transformers CLIPModel directory with its processor); ConfigError naming it otherwise.

    `batch_size`: images per forward pass (None: all at once).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    _check_pairs(images, prompts)

    def load() -> tuple[Any, Any]:
        try:
            model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
            return _TensorFeatures(model), processor
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"--clip {clip_dir}: not a transformers CLIP model directory ({e})"
            ) from None

    metric = CLIPScore(model_name_or_path=load).to(device)
    with torch.no_grad():
        for sl in _batches(len(images), batch_size):
            metric.update([_uint8(img).to(device) for img in images[sl]], list(prompts[sl]))
    return float(metric.compute())


def itc_score(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    score_fn: Callable[[Sequence[Image.Image], Sequence[str]], np.ndarray],
    *,
    batch_size: int | None = None,
) -> float:
    """100 x the mean cosine of each image with its own prompt: the diagonal of
    `score_fn(images, texts)` ([N, M] ITC cosines, e.g. `Predictor.score`), in batches of
    `batch_size` pairs (None: one call)."""
    _check_pairs(images, prompts)
    diagonal = [
        np.diag(np.asarray(score_fn(images[sl], prompts[sl]), dtype=np.float64))
        for sl in _batches(len(images), batch_size)
    ]
    return 100.0 * float(np.concatenate(diagonal).mean())


def model_score_fn(encoder: Any) -> Callable[[Sequence[Image.Image], Sequence[str]], np.ndarray]:
    """ITC cosine scores [N, M] of a loaded model directory (`vlp.models.family.load_model`),
    preprocessed by its own transform: the `score_fn` of any vlp, CLIP or BLIP directory.
    Puts the model in eval mode."""
    encoder.model.eval()

    @torch.no_grad()
    def score(images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        image = encoder.image_features(encoder.transform.pixels(list(images)))[1]
        text = encoder.text_features(list(texts))
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        return (image @ text.T).cpu().numpy()

    return score


# ---------------------------------------------------------------- Fréchet distance


class ImageTowerFeatures(torch.nn.Module):
    """A vlp model's L2-normalised ITC image embedding [B, E] of uint8 images [B, 3, H, W],
    preprocessed by its transform: FID features without Inception weights.

    `model` has `encode_image(pixels) -> (states, features)` (every family's model, a
    `Predictor.model`, a `LoadedModel.model`), put in eval mode; `transform` has
    `pixels(PIL images)`.
    """

    def __init__(self, model: torch.nn.Module, transform: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.transform = transform
        self.num_features = int(self(torch.zeros((1, 3, 8, 8), dtype=torch.uint8)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in images]
        device = next(self.model.parameters()).device
        return self.model.encode_image(self.transform.pixels(pil).to(device))[1].float()


def inception_features(weights: Path) -> torch.nn.Module:
    """The standard FID extractor: torchmetrics' Inception v3 (2048 pool features) with the
    torch-fidelity weights file `weights`; ConfigError if it or torch-fidelity is missing."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ConfigError(
            "--inception-weights: the Inception v3 extractor needs the torch-fidelity package "
            "(pip install torch-fidelity); without it, FID uses --model's image features"
        )
    if not Path(weights).is_file():
        raise ConfigError(f"--inception-weights {weights}: file not found")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights),
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"--inception-weights {weights}: not Inception v3 weights ({e})"
        ) from None
    net.num_features = 2048
    return net


def frechet_distance(
    real_images: Sequence[Image.Image],
    generated_images: Sequence[Image.Image],
    features: torch.nn.Module,
    feature_name: str,
    *,
    batch_size: int | None = None,
) -> float:
    """torchmetrics' FrechetInceptionDistance between two image sets under `features` (a
    module from uint8 images [B, 3, H, W] to features [B, D], named `feature_name` in errors).

    Every image is brought to the size of the first real one (bicubic) so that batches stack;
    `batch_size`: images per forward pass (None: a set at once). ResultsError with fewer than
    two images in a set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, images in (("reference", real_images), ("generated", generated_images)):
        if len(images) < 2:
            raise ResultsError(
                f"FID ({feature_name}): {len(images)} {name} images; needs 2 or more"
            )
    device = next(iter(features.parameters()), torch.zeros(0)).device  # the extractor's
    metric = FrechetInceptionDistance(feature=features).to(device)
    side = max(real_images[0].size)
    for images, real in ((real_images, True), (generated_images, False)):
        for sl in _batches(len(images), batch_size):
            metric.update(torch.stack([_uint8(img, side) for img in images[sl]]).to(device), real)
    return float(metric.compute())
