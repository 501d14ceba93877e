"""What the pretrain-vision stage shows of its masked autoencoder: reconstructions and metrics.

`ReconstructionGrid` draws the same images under the same mask at every logged step: one row
per image, columns original | masked input | reconstruction. The reconstruction is the
model's prediction of the hidden patches with the visible ones pasted back, as MAE's own
visualisation shows it; with `norm_pix_loss` the model predicts per-patch normalised pixels,
which are given back the mean and variance of the original's patches first. `write_results`
writes `<runtime.metrics_dir>/pretrain_vision.json`, the loss curve
`<runtime.plots_dir>/pretrain_vision_loss.csv` and the final grid
`<runtime.plots_dir>/pretrain_vision_reconstructions.png`, and logs them to the stage's run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vlp.config import Config
from vlp.io import atomic_path, atomic_write_csv, atomic_write_json

if TYPE_CHECKING:
    from vlp.data.images import Transform

METRICS_FILE = "pretrain_vision.json"
LOSS_FILE = "pretrain_vision_loss.csv"
GRID_FILE = "pretrain_vision_reconstructions.png"
GRID_ARTIFACTS = "reconstructions"  # the run's folder of one grid per logged step
PLOT_COLUMNS = ("step", "loss", "lr")
MASKED_GREY = 128  # hidden patches in the masked-input column
NORM_EPS = 1.0e-6  # as ViTMAEForPreTraining's norm_pix_loss


def evenly_spaced(n_items: int, k: int) -> list[int]:
    """`k` indices spread evenly over `n_items` (the first always among them)."""
    return [i * n_items // k for i in range(k)]


def _pixel_scale(transform: Transform) -> tuple[float, np.ndarray, np.ndarray]:
    """(rescale factor, mean, std) that turned 0-255 pixels into the model's inputs."""
    from vlp.data.images import ImageTransform

    if isinstance(transform, ImageTransform):
        return 1 / 255, np.asarray(transform.mean), np.asarray(transform.std)
    p = transform.processor
    scale = p.rescale_factor if p.do_rescale else 1.0
    if not p.do_normalize:
        return scale, np.zeros(3), np.ones(3)
    return scale, np.asarray(p.image_mean), np.asarray(p.image_std)


def to_uint8(pixels: torch.Tensor, transform: Transform) -> np.ndarray:
    """Model inputs [N, 3, H, W] back to uint8 images [N, H, W, 3]."""
    scale, mean, std = _pixel_scale(transform)
    x = pixels.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip(np.rint((x * std + mean) / scale), 0, 255).astype(np.uint8)


class ReconstructionGrid:
    """Fixed images and a fixed mask (seeded noise), drawn by the model as it trains."""

    def __init__(self, pixels: torch.Tensor, num_patches: int, seed: int, transform: Any) -> None:
        self.pixels = pixels
        generator = torch.Generator().manual_seed(seed)  # never the training RNG
        self.noise = torch.rand(len(pixels), num_patches, generator=generator)
        self.transform = transform

    @torch.no_grad()
    def draw(self, model: Any) -> Image.Image:
        """The grid of `model` now: N rows of original | masked input | reconstruction."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pixels = self.pixels.to(device)
        try:
            out = model(pixel_values=pixels, noise=self.noise.to(device))
        finally:
            model.train(was_training)
        target = model.patchify(pixels)
        pred = out.logits.float()
        if model.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + NORM_EPS) ** 0.5 + mean
        hidden = out.mask.unsqueeze(-1)  # 1: hidden from the encoder
        size = tuple(pixels.shape[2:])
        recon = model.unpatchify(pred * hidden + target * (1 - hidden), size)
        hidden_px = model.unpatchify(hidden.expand_as(target), size).bool().cpu()
        original = to_uint8(pixels, self.transform)
        masked = original.copy()
        masked[hidden_px.permute(0, 2, 3, 1).numpy()] = MASKED_GREY
        columns = [original, masked, to_uint8(recon, self.transform)]
        rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(len(pixels))]
        return Image.fromarray(np.concatenate(rows, axis=0))


def save_png(image: Image.Image, path: Path) -> None:
    """Write `image` as a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def log_grid(run: Any, image: Image.Image, step: int) -> None:
    """Log `image` to the run as `reconstructions/step-<step>.png`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"step-{step:08d}.png"
        image.save(path, format="PNG")
        run.log_artifact(path, GRID_ARTIFACTS)


def write_results(
    cfg: Config,
    run: Any,
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    grid: Image.Image | None,
) -> None:
    """Write the metrics, loss curve and final grid; log them (and numeric metrics) to `run`.

    With no `run` (the stage disabled) only the files are written.
    """
    metrics_path = Path(cfg.runtime.metrics_dir) / METRICS_FILE
    plot_path = Path(cfg.runtime.plots_dir) / LOSS_FILE
    grid_path = Path(cfg.runtime.plots_dir) / GRID_FILE
    atomic_write_json(metrics_path, metrics)
    atomic_write_csv(plot_path, PLOT_COLUMNS, history)
    # disabled: DVC still needs the declared image; one grey pixel says there is none
    save_png(grid if grid is not None else Image.new("RGB", (1, 1), (MASKED_GREY,) * 3), grid_path)
    if run is not None:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        for path in (metrics_path, plot_path, grid_path):
            run.log_artifact(path)
    print(json.dumps(metrics, indent=2))
