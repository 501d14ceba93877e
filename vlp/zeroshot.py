"""Any checkpoint measured without training (`vlp zeroshot`); the inference `vlp embed` shares.

The checkpoint is a directory `vlp.models.family.load_model` reads: a vlp model (the
pretrained one or a finetuned task model), a transformers `CLIPModel` or a BLIP retrieval
checkpoint, run as `vlp.inference.load_inference` has it (batches of `zeroshot.batch_size`,
`zeroshot.precision`). Features are returned as float32.

- retrieval: R@1/5/10 both ways on a split's captions, VSE++ protocol, the keys `vlp eval
  retrieval` prints. Models with an ITM head re-rank each query's ITC top `rerank_k` as the
  retrieval task does (`vlp.tasks.retrieval.ranking`), each candidate scored as
  `rerank_score` says (`blip`: BLIP's own evaluation); the ITC-only scores come as `itc_*`.
- classification, as CLIP evaluates it: each class is embedded as the mean of its
  normalised prompt embeddings (class name in every template), renormalised; an image's
  class is the most similar one; top-1 and top-5 accuracy in percent. Labels come from an
  image-folder tree (`DATA/<class>/<image>`, as ImageNet), a CSV/Parquet of
  `image_id,label` over a dataset's images, or `shapes`: the shapes world's single-object
  scenes labelled by their shape (`vlp.data.shapes.single_shape_labels`). Class names may
  come from a file (`--classes`); prompts from a file or a named set (`vlp.prompts`:
  `openai_imagenet`, CLIP's 80 ImageNet templates). Top-1/top-5 accuracy and mean per-class
  recall, also in CLIP_benchmark's layout (`vlp.metrics.clip_benchmark`).

Captioning and VQA of models that write text (`vlp zeroshot --task captioning|vqa`) are
measured by their task packages (`vlp.tasks.captioning.zeroshot`, `vlp.tasks.vqa.zeroshot`),
on the same settings. `vlp embed` (`vlp.embeddings`) runs a checkpoint the same way
(`load_inference`, `image_features`, `text_features`).

`vlp zeroshot` records an MLflow run (stage `zeroshot`) with the model directory, the data,
split and precision, every number, and the content hashes of what it read: the model
(`vlp.input.model`), the dataset or image folder (`vlp.input.data`, `dataset_hash`) and a
label file (`vlp.input.labels`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch.nn import functional as F

from vlp.data.images import IMAGE_SUFFIXES
from vlp.errors import ConfigError, DataError
from vlp.inference import (
    SHAPES_LABELS,
    Inference,
    image_batches,
    load_inference,
    read_inputs,
    record_zeroshot,
    run_params,
    start_zeroshot,
)

if TYPE_CHECKING:
    from vlp.config import Config

# ---------------------------------------------------------------- features


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """Features in float32, L2-normalised again after any bf16 rounding."""
    return F.normalize(x.float(), dim=-1)


@torch.no_grad()
def image_features(
    run: Inference, data_dir: Path, image_paths: Sequence[str], keep_states: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(image states [N, L, H] if `keep_states` else None, normalised features [N, E] fp32)."""
    states, feats = [], []
    transform = run.encoder.transform
    for pixels in image_batches(data_dir, image_paths, run.batch_size, transform):
        with run.autocast():
            s, f = run.encoder.image_features(pixels)
        feats.append(_normalised(f))
        if keep_states:
            states.append(s)
    return (torch.cat(states) if keep_states else None), torch.cat(feats)


@torch.no_grad()
def text_features(run: Inference, texts: Sequence[str]) -> torch.Tensor:
    """Normalised text features [M, E] (fp32); each batch padded to its own longest text."""
    feats = []
    for start in range(0, len(texts), run.batch_size):
        with run.autocast():
            feats.append(
                _normalised(run.encoder.text_features(texts[start : start + run.batch_size]))
            )
    if not feats:
        return torch.zeros((0, 0))
    return torch.cat(feats)


# ---------------------------------------------------------------- retrieval


def split_pairs(data_dir: Path, split: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(caption pairs, unique images in first-seen order) of a split (None: every split)."""
    from vlp.data.manifest import PAIRS_FILE, no_rows_in_splits, read_pairs

    if not (data_dir / PAIRS_FILE).is_file():
        raise DataError(f"--data {data_dir}: no {PAIRS_FILE}; not a vlp dataset")
    pairs = read_pairs(data_dir, split)
    if pairs.empty:
        raise no_rows_in_splits(data_dir, split, "caption pairs")
    images = pairs.drop_duplicates("image_id")[["image_id", "image_path"]].reset_index(drop=True)
    return pairs, images


def resolve_rerank_k(run: Inference, cfg: Config, rerank_k: int | None) -> int:
    """ITM re-ranking depth: `--rerank-k`, else a task model's own, else `zeroshot.rerank_k`.

    0 when the model has no ITM head (ITC ranking only).
    """
    if rerank_k is not None and rerank_k < 0:
        raise ConfigError(f"--rerank-k: must be >= 0, got {rerank_k}")
    if not run.encoder.has_itm:
        return 0
    if rerank_k is not None:
        return rerank_k
    info = run.encoder.task_info or {}
    return int(info.get("rerank_k", cfg.zeroshot.rerank_k))


@torch.no_grad()
def retrieval_metrics(
    run: Inference, data_dir: Path, split: str, rerank_k: int, rerank_score: str
) -> dict[str, float]:
    """Recall@K both ways of a split's images and captions (ITM re-ranked when rerank_k > 0)."""
    from vlp.metrics.retrieval import retrieval_recall

    pairs, images = split_pairs(data_dir, split)
    index = {int(i): n for n, i in enumerate(images["image_id"])}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    captions = [str(c) for c in pairs["caption"]]
    rerank = rerank_k > 0 and run.encoder.has_itm
    states, image_feat = image_features(run, data_dir, list(images["image_path"]), rerank)
    if rerank:
        from vlp.models.embed import encode_texts
        from vlp.tasks.retrieval.ranking import retrieval_scores

        model = run.encoder.model
        with run.autocast():
            ids, mask, text_feat = encode_texts(model, captions, run.batch_size)
            text_feat = _normalised(text_feat)
            scores = retrieval_scores(
                model, states, image_feat, ids, mask, text_feat, rerank_k, run.batch_size,
                score=rerank_score,
            )  # fmt: skip
        metrics = retrieval_recall(text_to_image, scores.itc, scores.i2t, scores.t2i)
    else:
        text_feat = text_features(run, captions)
        metrics = retrieval_recall(text_to_image, image_feat @ text_feat.T)
    return {
        **metrics,
        "rerank_k": float(rerank_k if rerank else 0),
        "n_images": float(len(images)),
        "n_texts": float(len(captions)),
    }


# ---------------------------------------------------------------- classification


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; ConfigError naming it if unreadable or empty."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"{what} {path}: holds no lines")
    return lines


def check_templates(templates: Sequence[str], source: str) -> list[str]:
    """The prompt templates, each holding "{}" exactly once; ConfigError naming `source`."""
    if not templates:
        raise ConfigError(f"{source}: no prompt templates")
    for t in templates:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ConfigError(f"{source}: template {t!r} must hold '{{}}' (the class name) once")
    return list(templates)


def resolve_templates(cfg: Config, templates: str | None) -> list[str]:
    """`--templates` (a file, else a named set of `vlp.prompts`), else `zeroshot.templates`
    (a list, or a set's name)."""
    from vlp.prompts import template_set

    if templates is not None:
        if Path(templates).is_file():
            return check_templates(read_lines(templates, "--templates"), f"--templates {templates}")
        return check_templates(template_set(templates, "--templates"), templates)
    own = cfg.zeroshot.templates
    if isinstance(own, str):
        return check_templates(template_set(own, "zeroshot.templates"), own)
    return check_templates(own, "zeroshot.templates")


def image_folder_labels(root: Path) -> pd.DataFrame:
    """(image_path, label) of an image-folder tree `root/<class>/<image>`, as ImageNet's.

    Images nested deeper count for their top folder's class; `image_path` is relative to root.
    """
    rows = [
        (path.relative_to(root).as_posix(), cls.name)
        for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in sorted(cls.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise DataError(f"--data {root}: no images in class folders ({root}/<class>/<image>)")
    return pd.DataFrame(rows, columns=["image_path", "label"])


def read_label_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet of image_id,label; DataError naming the file otherwise."""
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise DataError(f"--labels {path}: cannot read it as CSV or Parquet ({e})") from None
    missing = [c for c in ("image_id", "label") if c not in table.columns]
    if missing:
        raise DataError(f"--labels {path}: lacks column {missing[0]!r} (needs image_id,label)")
    if table["image_id"].duplicated().any():
        dup = table["image_id"][table["image_id"].duplicated()].iloc[0]
        raise DataError(f"--labels {path}: image_id {dup} is labelled twice")
    return table[["image_id", "label"]].astype({"label": str})


def labelled_images(data_dir: Path, split: str, labels: str | None) -> pd.DataFrame:
    """(image_path, label) of the images to classify.

    `labels` None: `data_dir` is an image-folder tree (no manifests; the split is the
    folder). `shapes`: the split's single-object shapes scenes. Else a CSV/Parquet of
    `image_id,label` over the split's images (images it does not label are left out).
    """
    from vlp.data.manifest import PAIRS_FILE

    if labels is None:
        if (data_dir / PAIRS_FILE).is_file():
            raise ConfigError(
                f"--data {data_dir} is a vlp dataset: pass --labels FILE (CSV/Parquet of "
                f"image_id,label) or --labels {SHAPES_LABELS} (the shapes world's shapes)"
            )
        return image_folder_labels(data_dir)
    pairs, images = split_pairs(data_dir, split)
    if labels == SHAPES_LABELS:
        from vlp.data.shapes import single_shape_labels

        out = single_shape_labels(pairs)
        if out.empty:
            raise DataError(f"--data {data_dir}: no single-object shapes scene in split {split!r}")
        return out[["image_path", "label"]]
    table = read_label_table(Path(labels))
    out = images.merge(table, on="image_id", how="inner")
    if out.empty:
        raise DataError(f"--labels {labels}: labels none of the images of split {split!r}")
    return out[["image_path", "label"]].reset_index(drop=True)


@torch.no_grad()
def class_embeddings(
    run: Inference, classes: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """[C, E]: per class, the mean of its normalised prompt embeddings, renormalised (CLIP)."""
    prompts = [t.format(c) for c in classes for t in templates]
    feats = text_features(run, prompts).reshape(len(classes), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


@torch.no_grad()
def classification_metrics(
    run: Inference,
    data_dir: Path,
    images: pd.DataFrame,
    classes: Sequence[str] | None,
    templates: Sequence[str],
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of zero-shot classification of labelled images.

    `classes` None: the sorted labels present. A label outside `classes` is a DataError.
    """
    classes = list(classes) if classes else sorted(images["label"].unique())
    if len(set(classes)) != len(classes):
        raise ConfigError("--classes: a class is named twice")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(images["label"]) - set(index))
    if unknown:
        raise DataError(f"label {unknown[0]!r} is not one of the {len(classes)} classes")
    target = torch.tensor([index[label] for label in images["label"]])
    _, image_feat = image_features(run, data_dir, list(images["image_path"]))
    logits = image_feat @ class_embeddings(run, classes, templates).T
    top = logits.topk(min(5, len(classes)), dim=1).indices
    hits = top == target[:, None]
    per_class = [hits[target == c, 0].float().mean() for c in target.unique()]
    return {
        "top1_accuracy": 100.0 * hits[:, 0].float().mean().item(),
        "top5_accuracy": 100.0 * hits.any(dim=1).float().mean().item(),
        # balanced accuracy: the mean over the classes present of their top-1 recall
        "mean_per_class_recall": 100.0 * torch.stack(per_class).mean().item(),
        "chance_top1": 100.0 / len(classes),
        "n_images": float(len(images)),
        "n_classes": float(len(classes)),
        "n_templates": float(len(templates)),
    }


# ---------------------------------------------------------------- the command


def zeroshot(
    cfg: Config,
    model_dir: Path,
    data_dir: Path,
    *,
    split: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    rerank_k: int | None = None,
    rerank_score: str | None = None,
    classify: bool = False,
    labels: str | None = None,
    classes_file: str | None = None,
    templates_file: str | None = None,
) -> dict[str, float]:
    """Measure the checkpoint at `model_dir` on `data_dir`: retrieval, or classification with
    `classify`; record an MLflow run; return the scores. (Captioning and VQA are measured by
    their task packages: `vlp.tasks.<task>.zeroshot`.)"""
    from vlp.tasks.retrieval.task import rerank_score_for

    if not classify and (labels or classes_file or templates_file):
        raise ConfigError("--labels, --classes and --templates need --classify")
    split, sha = start_zeroshot(cfg, model_dir, data_dir, split)
    templates = resolve_templates(cfg, templates_file)
    classes = read_lines(classes_file, "--classes") if classes_file else None
    mode = "classification" if classify else "retrieval"
    run = load_inference(cfg, model_dir, precision, batch_size, mode)
    params = run_params(run, model_dir, sha, data_dir, split, "classify" if classify else mode)
    if classify:
        images = labelled_images(data_dir, split, labels)
        # an image-folder tree has no splits: it is the split
        params.update(labels=labels or "folders", templates=json.dumps(templates))
        if labels is None:
            params["split"] = "none"
        metrics = classification_metrics(run, data_dir, images, classes, templates)
    else:
        k = resolve_rerank_k(run, cfg, rerank_k)
        info, default = run.encoder.task_info, cfg.zeroshot.rerank_score
        score = rerank_score_for(rerank_score, info, run.encoder.path, default)
        params.update(rerank_k=k, rerank_score=score if k else "none")
        metrics = retrieval_metrics(run, data_dir, split, k, score)
    record_zeroshot(cfg, params, metrics, read_inputs(model_dir, sha, data_dir, labels), sha)
    return metrics
