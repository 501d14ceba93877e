"""Scoring a generation model on the evaluation split's captions (`score_generation`).

The prompts are `evaluate.generation_prompts` captions of `evaluate.split`, evenly spaced over
its pairs (every caption style of the shapes world comes up). Each prompt gets the model's
`num_candidates` samples once; the kept image is then chosen in every way the model can
(`none`: the first sample; `itc`; `itm` with an ITM head), so the re-ranking gain is measured
on the same samples:

- compositional accuracy (`vlp.metrics.generation.compositional_scores`: the scene parser
  reads each image back) of the images the model's own `rerank` keeps: `exact_match`,
  `exact_match_one_object`, `count`, `color`, `shape`, `size`, `position`, `relation` (and
  how many prompts were scored); the same with `_no_rerank` (the first sample),
  `exact_match_rerank_<itc|itm>` and `rerank_gain` (`exact_match - exact_match_no_rerank`);
  on captions that are no shapes scenes (photos) only the counts of prompts;
- `itc_score`: the pretrained model's (`finetune.init_dir`) ITC agreement of kept image and
  prompt (100 x mean cosine), `itc_score_no_rerank` of the first samples; `clip_score` with
  `evaluate.generation_clip_dir`;
- `frechet_distance_<features>`: kept images against every image of the split (at the
  generated size), in the pretrained model's ITC image embedding (`image_tower`), or in
  torchmetrics' Inception v3 features with `evaluate.generation_inception_weights`
  (`inception`: the standard FID);
- `images_per_s`: sampled images per second (candidates included).

`predictor` is a generation `Predictor` (`vlp.tasks.generation.task`). The pretrained model is
the judge of both inits, so their scores compare; re-ranking uses each
model's own (what it ships with).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlp.tasks.spec import Example, TaskEval

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from vlp.config import Config

GALLERY_FILES = ("gallery.png", "gallery.html")
COUNTS = ("prompts", "unparsable_prompts")  # how many prompts were scored, not scores
# how each prompt's image is kept ("none", "itc", "itm") -> (candidate index, image) per prompt
Kept = dict[str, tuple[list[int], list["Image.Image"]]]


def evaluation_prompts(data: Path, split: str, n: int) -> pd.DataFrame:
    """`n` caption pairs of `split`, evenly spaced over its manifest order (all if fewer)."""
    from vlp.data.manifest import read_pairs
    from vlp.errors import ConfigError, DataError

    if n < 1:
        raise ConfigError(f"evaluate.generation_prompts: must be >= 1, got {n}")
    pairs = read_pairs(data, split)
    if pairs.empty:
        raise DataError(f"{data}: no captions in split {split!r} to generate from")
    n = min(n, len(pairs))
    return pairs.iloc[[i * len(pairs) // n for i in range(n)]].reset_index(drop=True)


def _judge(cfg: Config, device: torch.device) -> Any:
    from vlp.models.family import load_model

    return load_model(cfg.finetune.init_dir, device=device, key="finetune.init_dir")


def _kept(predictor: Any, prompts: list[str], candidates: list[list[Image.Image]]) -> Kept:
    """(candidate index, image) kept per prompt by every way the model can keep one."""
    out: Kept = {}
    for how in ("none", "itc", *(["itm"] if predictor.has_itm else [])):
        picks = predictor.pick(prompts, candidates, how)
        out[how] = (picks, [group[i] for group, i in zip(candidates, picks, strict=True)])
    return out


def _compositional(
    prompts: list[str], kept: Kept, own: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Compositional scores of the images each way keeps (the model's own way's unsuffixed),
    and the parse rows of the images it keeps; no scores where no prompt is a shapes scene."""
    from vlp.metrics.generation import compositional_scores

    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for how, (picks, images) in kept.items():
        scores, parsed = compositional_scores(prompts, images)
        if how == own:
            metrics.update(scores)
            rows = [{**r, "candidate": i} for r, i in zip(parsed, picks, strict=True)]
        if "exact_match" not in scores:  # e.g. photos: their captions are no shapes scenes
            continue
        if how == "none":
            metrics.update({f"{k}_no_rerank": v for k, v in scores.items() if k not in COUNTS})
        else:
            metrics[f"exact_match_rerank_{how}"] = scores["exact_match"]
    if "exact_match" in metrics:
        metrics["rerank_gain"] = metrics["exact_match"] - metrics["exact_match_no_rerank"]
    return metrics, rows


def _agreement_and_distance(
    cfg: Config, predictor: Any, data: Path, prompts: list[str], kept: Kept
) -> dict[str, float]:
    """ITC (and CLIP) score of kept images and prompts; Fréchet distance to the split's images."""
    from vlp.data.images import ImageTransform
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import read_images
    from vlp.metrics.feature_scores import (
        ImageTowerFeatures,
        clip_score,
        frechet_distance,
        inception_features,
        itc_score,
        model_score_fn,
    )
    from vlp.tasks.generation import UNIT_RANGE

    judge = _judge(cfg, predictor.device)
    batch = cfg.evaluate.batch_size
    score_fn = model_score_fn(judge)
    first, kept = kept["none"][1], kept[predictor.sampling.rerank][1]
    out = {
        "itc_score": itc_score(kept, prompts, score_fn, batch_size=batch),
        "itc_score_no_rerank": itc_score(first, prompts, score_fn, batch_size=batch),
    }
    clip_dir = cfg.evaluate.generation_clip_dir
    if clip_dir is not None:
        out["clip_score"] = clip_score(
            kept, prompts, Path(clip_dir), device=predictor.device, batch_size=batch
        )
    # the split's images as the generator saw its training images
    size, resize = int(predictor.info["generated_size"]), str(predictor.info["generated_resize"])
    paths = read_pairs(data, cfg.evaluate.split).drop_duplicates("image_id")["image_path"]
    real = read_images(data, list(paths), ImageTransform(size, resize, **UNIT_RANGE))
    weights = cfg.evaluate.generation_inception_weights
    if weights is None:
        features, name = ImageTowerFeatures(judge.model, judge.transform), "image_tower"
    else:
        features, name = inception_features(Path(weights)).to(predictor.device), "inception"
    out[f"frechet_distance_{name}"] = frechet_distance(real, kept, features, name, batch_size=batch)
    return out


def _gallery(prompts: list[str], candidates: list[list[Image.Image]], n: int) -> dict[str, bytes]:
    """The gallery (prompts x candidates) of the first `n` prompts, PNG and HTML."""
    from vlp.metrics.generation import write_gallery

    with tempfile.TemporaryDirectory() as tmp:
        files = write_gallery(Path(tmp), prompts[:n], candidates[:n])
        return {
            name: Path(path).read_bytes() for name, path in zip(GALLERY_FILES, files, strict=True)
        }


def _plotted(metric: str) -> bool:
    """Whether a metric is a compositional accuracy the scores plot shows (in percent)."""
    if metric in COUNTS or metric in ("images_per_s", "rerank_gain"):
        return False
    if metric.startswith(("frechet_distance", "itc_score", "clip_score")):
        return False
    return metric == "exact_match_no_rerank" or not metric.endswith("_no_rerank")


def score_generation(cfg: Config, predictor: Any, data: Path) -> TaskEval:
    """Every generation score of `predictor` on the evaluation prompts (see the module doc)."""
    from vlp.data.manifest import resolve_image

    chosen = evaluation_prompts(data, cfg.evaluate.split, cfg.evaluate.generation_prompts)
    prompts = [str(c) for c in chosen["caption"]]
    t0 = time.perf_counter()
    candidates = predictor.candidates(prompts, predictor.sampling)
    sample_s = time.perf_counter() - t0
    kept = _kept(predictor, prompts, candidates)
    metrics, rows = _compositional(prompts, kept, predictor.sampling.rerank)
    metrics.update(_agreement_and_distance(cfg, predictor, data, prompts, kept))
    metrics["images_per_s"] = len(prompts) * predictor.sampling.num_candidates / sample_s
    results = [
        {"caption_id": int(c), "image_id": int(i), "prompt": p, **row}
        for c, i, p, row in zip(
            chosen["caption_id"], chosen["image_id"], prompts, rows, strict=True
        )
    ]
    plot_rows = [{"metric": k, "score": v} for k, v in metrics.items() if _plotted(k)]
    examples = [
        Example(
            image_path=resolve_image(data, str(chosen["image_path"][i])),
            ground_truth=[prompts[i]],
            prediction=f"generated, parsed as: {rows[i]['objects']} "
            f"(exact match: {rows[i]['exact']})",
            query="the dataset's image of the prompt; the generated images are in the gallery",
        )
        for i in range(min(cfg.evaluate.num_examples, len(prompts)))
    ]
    files = _gallery(prompts, candidates, cfg.evaluate.num_examples)
    return TaskEval(metrics, results, plot_rows, examples, files)
