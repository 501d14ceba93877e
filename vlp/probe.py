"""The `probe` stage: what a frozen image encoder's global token knows of shape and colour.

Linear probing, as MAE and DINO measure their encoders: a linear softmax classifier is fitted
on frozen features of the one-object scenes of `probe.train_split` and scored on those of
`probe.eval_split`, once per label: the object's shape (5 classes) and its colour (7). The
labels are the scenes' own (`vlp.data.shapes.single_object_labels`). An image's feature is
the first (global) token the image tower gives the rest of the model: the CLS token of a ViT,
the pooled map of a CNN, projected and normalised by the tower.

Three encoders, each with its own image transform:

- `random`: the image tower the `model` section describes, freshly initialised (seeded by
  `seed`);
- `mae`: the ViTMAE encoder `pretrain-vision` trained (`pretrain_vision.out_dir`) under a
  fresh (seeded) projection, as VLP pretraining starts from it; null when the directory holds
  no trained MAE (the stage was disabled);
- `pretrained`: the image tower of the VLP-pretrained model (`pretrain.out_dir`), of any
  family (`image_states`: a generative family's image encoder, as its decoder reads it).

The classifier: features standardised with the training images' mean and std, then
full-batch L-BFGS on cross-entropy plus `probe.l2` times the squared weights, from zero
weights, in float64: deterministic. Chance is the accuracy of always answering the training
images' most frequent class. On a dataset whose captions describe no one-object scene (a
user's photos) the stage writes `{"skipped": why}` and fits nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn import functional as F

from vlp.config import Config, ProbeConfig
from vlp.data.shapes import COLORS, SHAPES

PROBE_FILE = "probe.json"  # in runtime.metrics_dir
CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS)}
STD_FLOOR = 1e-6  # a feature constant over the training images standardises to 0

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels [B, 3, S, S] -> features [B, D]


def probe_labels(data_root: str | Path, split: str) -> pd.DataFrame:
    """The one-object scenes of `split` with their shape and colour (empty for other data)."""
    from vlp.data.manifest import read_pairs
    from vlp.data.shapes import single_object_labels

    return single_object_labels(read_pairs(data_root, split))


def _targets(labels: pd.DataFrame, name: str) -> torch.Tensor:
    """Class indices (in `CLASSES[name]` order) of the `name` column."""
    index = {c: i for i, c in enumerate(CLASSES[name])}
    return torch.tensor([index[v] for v in labels[name]], dtype=torch.long)


def majority_accuracy(train_y: torch.Tensor, eval_y: torch.Tensor, num_classes: int) -> float:
    """Accuracy (%) on `eval_y` of always answering the most frequent class of `train_y`."""
    majority = int(torch.bincount(train_y, minlength=num_classes).argmax())
    return 100.0 * float((eval_y == majority).double().mean())


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    num_classes: int,
    settings: ProbeConfig,
) -> float:
    """Accuracy (%) on (`eval_x`, `eval_y`) of a linear classifier fitted on the training pair.

    Features [N, D] are standardised with the training mean and std; the classifier starts
    from zeros and takes `settings.max_iter` full-batch L-BFGS iterations (strong Wolfe line
    search) on cross-entropy + `settings.l2` * |W|^2. Predictions tie-break to the lowest class.
    """
    train_x, eval_x = train_x.double(), eval_x.double()
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(STD_FLOOR)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    weight = torch.zeros(num_classes, train_x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=settings.max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(train_x, weight, bias), train_y)
        loss = loss + settings.l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        predicted = F.linear(eval_x, weight, bias).argmax(1)
    return 100.0 * float((predicted == eval_y).double().mean())


def score_features(
    train_x: torch.Tensor,
    eval_x: torch.Tensor,
    train: pd.DataFrame,
    evaluated: pd.DataFrame,
    settings: ProbeConfig,
) -> dict[str, float]:
    """The probe's accuracy (%) per label (`CLASSES`) of features of the labelled images."""
    return {
        name: fit_linear_probe(
            train_x,
            _targets(train, name),
            eval_x,
            _targets(evaluated, name),
            len(classes),
            settings,
        )
        for name, classes in CLASSES.items()
    }


@torch.no_grad()
def global_features(
    encode: Encoder,
    data_root: str | Path,
    paths: list[str],
    transform: Any,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Features [N, D] (float32, CPU) of the images at manifest `paths`, batch by batch."""
    from vlp.data.manifest import image_roots, locate_image
    from vlp.data.torch_data import open_image

    roots = image_roots(data_root)
    out = []
    for start in range(0, len(paths), batch_size):
        images = [
            open_image(locate_image(data_root, rel, roots))
            for rel in paths[start : start + batch_size]
        ]
        out.append(encode(transform.pixels(images).to(device)).float().cpu())
    return torch.cat(out)


def _tower_encoder(cfg: Config, model: Any, device: torch.device) -> tuple[Encoder, Any]:
    """(global token of a seeded fresh image tower of `model`, its image transform)."""
    from vlp.data.images import image_transforms
    from vlp.models.towers import build_image_tower

    torch.manual_seed(cfg.seed)
    tower = build_image_tower(model, cfg.model.hidden_size).to(device).eval()
    transform = image_transforms(dataclasses.replace(cfg, model=model))[0]
    return (lambda pixels: tower(pixels)[:, 0]), transform


def mae_dir(cfg: Config) -> Path | None:
    """The trained masked autoencoder to probe: `pretrain_vision.out_dir` when the stage ran."""
    from vlp.vision_init import trained_mae_dir

    return trained_mae_dir(cfg) if cfg.pretrain_vision.enabled else None


def encoders(cfg: Config, device: torch.device) -> dict[str, Callable[[], Any]]:
    """name -> builder of (encoder, transform), or of None where there is no such encoder."""
    from vlp.models.family import load_model

    def random() -> tuple[Encoder, Any]:
        scratch = dataclasses.replace(cfg.model, image_pretrained=None, init_from=None)
        return _tower_encoder(cfg, scratch, device)

    def mae() -> tuple[Encoder, Any] | None:
        directory = mae_dir(cfg)
        if directory is None:
            return None
        model = dataclasses.replace(
            cfg.model, image_tower="vit", image_pretrained=str(directory), init_from=None
        )
        return _tower_encoder(cfg, model, device)

    def pretrained() -> tuple[Encoder, Any]:
        loaded = load_model(cfg.pretrain.out_dir, device, key="pretrain.out_dir")
        loaded.model.eval()
        return (lambda pixels: loaded.model.image_states(pixels)[:, 0]), loaded.transform

    return {"random": random, "mae": mae, "pretrained": pretrained}


def probe_encoders(
    cfg: Config, train: pd.DataFrame, evaluated: pd.DataFrame, device: torch.device
) -> dict[str, Any]:
    """Each encoder's probe accuracy per label (None: no such encoder) and chance levels."""
    p, root = cfg.probe, cfg.data.root
    chance = {
        name: majority_accuracy(_targets(train, name), _targets(evaluated, name), len(classes))
        for name, classes in CLASSES.items()
    }
    accuracy: dict[str, dict[str, float] | None] = {}
    for name, build in encoders(cfg, device).items():
        built = build()
        if built is None:
            accuracy[name] = None
            continue
        encode, transform = built
        features = [
            global_features(
                encode, root, list(frame["image_path"]), transform, p.batch_size, device
            )
            for frame in (train, evaluated)
        ]
        accuracy[name] = score_features(*features, train, evaluated, p)
    return {
        "train_split": p.train_split,
        "eval_split": p.eval_split,
        "n_train": len(train),
        "n_eval": len(evaluated),
        "chance": chance,
        "accuracy": accuracy,
    }


def _check_settings(p: ProbeConfig) -> None:
    """ConfigError naming the first bad key of the probe section."""
    from vlp.data.manifest import check_split_names
    from vlp.errors import ConfigError

    check_split_names(p.train_split, "probe.train_split")
    check_split_names(p.eval_split, "probe.eval_split")
    for key in ("max_iter", "batch_size"):
        if getattr(p, key) < 1:
            raise ConfigError(f"probe.{key}: must be >= 1, got {getattr(p, key)}")
    if p.l2 < 0:
        raise ConfigError(f"probe.l2: must be >= 0, got {p.l2}")


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a probe result as flat MLflow metrics (`pretrained_shape_accuracy`, ...)."""
    flat = {f"chance_{k}_accuracy": v for k, v in result.get("chance", {}).items()}
    for encoder, scores in result.get("accuracy", {}).items():
        flat.update({f"{encoder}_{k}_accuracy": v for k, v in (scores or {}).items()})
    return flat


def probe(cfg: Config) -> Path:
    """Run the probe stage; return the `probe.json` it wrote in `runtime.metrics_dir`."""
    from vlp.data.manifest import dataset_hash
    from vlp.io import atomic_write_json
    from vlp.models.tokenizer import local_dir
    from vlp.tasks import model_sha256
    from vlp.tracking import check_stage_outputs, stage_run
    from vlp.train.distributed import DistInfo
    from vlp.train.settings import resolve_device

    p, root = cfg.probe, cfg.data.root
    _check_settings(p)
    out = Path(cfg.runtime.metrics_dir) / PROBE_FILE
    check_stage_outputs(cfg, {"runtime.metrics_dir": out.parent})
    train, evaluated = probe_labels(root, p.train_split), probe_labels(root, p.eval_split)
    inputs = {"data": (root, dataset_hash(root))}
    if not (train.empty or evaluated.empty):
        local_dir(cfg.pretrain.out_dir, "pretrain.out_dir")  # before any encoder runs
        inputs["pretrain.out_dir"] = (cfg.pretrain.out_dir, model_sha256(cfg.pretrain.out_dir))
        mae = mae_dir(cfg)
        if mae is not None:
            inputs["pretrain_vision.out_dir"] = (str(mae), model_sha256(mae))
    params = {
        **{f"probe.{k}": v for k, v in vars(p).items()},
        "pretrain_vision.enabled": cfg.pretrain_vision.enabled,
    }
    with stage_run(cfg, "probe", params=params, inputs=inputs) as run:
        if train.empty or evaluated.empty:
            empty = p.train_split if train.empty else p.eval_split
            result: dict[str, Any] = {
                "skipped": f"{root}: split {empty!r} has no one-object scene of the shapes "
                "world, whose shape and colour the probe predicts"
            }
            print(f"probe: skipped: {result['skipped']}")
        else:
            result = probe_encoders(
                cfg, train, evaluated, resolve_device(cfg.runtime.device, DistInfo())
            )
        run.set_tags({"vlp.probe": "skipped" if "skipped" in result else "ran"})
        atomic_write_json(out, result)
        run.log_metrics(_metrics(result))
        run.log_artifact(out)
    return out
