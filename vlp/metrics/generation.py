"""Text-to-image metrics: compositional accuracy, text-image agreement, Fréchet distance.

- `compositional_scores` (`vlp.metrics.compositional`): GenEval's idea with the shapes world's own parser in place of a
  detector. `vlp.data.shapes_parse` reads each image back into objects and each prompt into
  its claims; a prompt's objects are matched to the image's (the one-to-one assignment that
  satisfies the most claims) and each claim is checked: `color`, `shape`, `size`, `position`
  (grid cell) per named object, `relation` per stated relation, `count` (the image has
  exactly as many objects as the prompt names: every shapes-world caption names its whole
  scene). `exact_match`: every claim of the prompt holds. All in percent; a key is left out
  when no prompt makes such a claim. A prompt no caption template reads is not scored: it is
  counted in `unparsable_prompts` (and its row says so), so a file of other prompts still
  gets its other metrics.
The three scored from a network's features live in `vlp.metrics.feature_scores` (torch and
torchmetrics), loaded only when a model is given:

- `clip_score`: torchmetrics' `CLIPScore` with a local transformers CLIP directory:
  max(100 * mean cosine(image, prompt), 0).
- `itc_score`: 100 * the mean cosine of each image with its own prompt under a vlp model's
  ITC embeddings (CLIPScore's scale, not clipped at 0); `score_fn` is e.g. a task
  `Predictor.score` or `model_score_fn(load_model(...))`.
- `frechet_distance`: torchmetrics' `FrechetInceptionDistance` over any feature extractor:
  the standard Inception v3 (`inception_features`, needs torch-fidelity and its weights
  file) or a vlp model's L2-normalised ITC image embedding (`ImageTowerFeatures`, in the
  manner of CLIP-FID; a distance between unit vectors, so far smaller than Inception FIDs).
- `write_gallery` (`vlp.metrics.gallery`): prompts x samples as one PNG grid and an HTML page.
- `score_generation_files`: all of them for `vlp eval generation` (COCO captions file of
  prompts, folder of images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vlp.errors import ConfigError, ResultsError
from vlp.io import load_json
from vlp.metrics.compositional import ATTRIBUTES, compositional_scores, scene_scores
from vlp.metrics.gallery import write_gallery

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTRIBUTES",
    "compositional_scores",
    "scene_scores",
    "score_generation_files",
    "write_gallery",
]

# ---------------------------------------------------------------- files


def _read_prompts(annotations: Path, images_dir: Path) -> tuple[list[str], list[Path]]:
    """(prompt, image file) per annotation of a COCO captions file (`images` give file_name
    per id, relative to `images_dir`); ResultsError naming the file otherwise."""
    from vlp.metrics.files import checked_records

    doc = load_json(annotations, ResultsError)
    ann = checked_records(annotations, doc, "annotations", {"image_id": int, "caption": str})
    listed = checked_records(annotations, doc, "images", {"id": int, "file_name": str})
    if not ann:
        raise ResultsError(f"{annotations}: no annotations")
    files = {rec["id"]: rec["file_name"] for rec in listed}
    root = Path(images_dir)
    if not root.is_dir():
        raise ResultsError(f"--images {images_dir}: not a folder")
    paths = []
    for i, rec in enumerate(ann):
        if rec["image_id"] not in files:
            raise ResultsError(
                f"{annotations}: annotation {i}'s image_id {rec['image_id']} is not in its images"
            )
        paths.append(root / files[rec["image_id"]])
    return [rec["caption"] for rec in ann], paths


def _open_all(paths: Sequence[Path]) -> dict[Path, Image.Image]:
    from vlp.data.manifest import open_image

    return {p: open_image(p).convert("RGB") for p in dict.fromkeys(paths)}


def _reference_images(reference_dir: Path) -> list[Image.Image]:
    from vlp.data.images import IMAGE_SUFFIXES

    root = Path(reference_dir)
    if not root.is_dir():
        raise ResultsError(f"--reference {reference_dir}: not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ResultsError(f"--reference {reference_dir}: {len(paths)} images; FID needs 2 or more")
    return list(_open_all(paths).values())


def score_generation_files(
    annotations: Path,
    images_dir: Path,
    *,
    model_dir: Path | None = None,
    clip_dir: Path | None = None,
    reference_dir: Path | None = None,
    inception_weights: Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
) -> dict[str, float | str]:
    """Every generation metric of generated images against the prompts they were drawn from.

    `annotations`: COCO captions JSON, each annotation's caption the prompt of its image
    (`images[].file_name` under `images_dir`; an image with several annotations is scored
    against each). Compositional scores always (shapes-world prompts); `clip_score` with
    `clip_dir`; `itc_score` with `model_dir` (any directory `load_model` reads); `fid` with
    `reference_dir`, under Inception v3 given `inception_weights`, else `model_dir`'s image
    features (`fid_features` names which). `batch_size`: images per forward pass (None: all).
    """
    prompts, paths = _read_prompts(annotations, images_dir)
    opened = _open_all(paths)
    images = [opened[p] for p in paths]
    scores: dict[str, float | str] = dict(compositional_scores(prompts, images)[0])
    scores["images"] = len(opened)
    if clip_dir is None and model_dir is None and reference_dir is None:
        return scores
    from vlp.metrics import feature_scores as fs

    if clip_dir is not None:
        scores["clip_score"] = fs.clip_score(
            images, prompts, Path(clip_dir), device=device, batch_size=batch_size
        )
    encoder = None
    if model_dir is not None:
        from vlp.models.family import load_model

        encoder = load_model(model_dir, device, key="--model", as_is=True)
        scores["itc_score"] = fs.itc_score(
            images, prompts, fs.model_score_fn(encoder), batch_size=batch_size
        )
    if reference_dir is not None:
        if inception_weights is not None:
            features, name = fs.inception_features(Path(inception_weights)).to(device), fs.INCEPTION
        elif encoder is not None:
            features = fs.ImageTowerFeatures(encoder.model, encoder.transform)
            name = f"itc:{Path(model_dir).resolve()}"  # type: ignore[arg-type]
        else:
            raise ConfigError(
                "--reference: FID needs --model (its image features) or --inception-weights"
            )
        scores["fid"] = fs.frechet_distance(
            _reference_images(Path(reference_dir)), list(opened.values()), features, name,
            batch_size=batch_size,
        )  # fmt: skip
        scores["fid_features"] = name
    return scores
