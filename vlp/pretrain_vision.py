"""The `pretrain-vision` stage: a masked autoencoder (MAE) learns from images alone.

The recipe's first step (docs/visual-pretraining.md). transformers' `ViTMAEForPreTraining`
trains on the unique images of `pretrain_vision.splits` of `data.root` (never the images of
the evaluation split, `evaluate.split` or `pretrain.eval_split`): from scratch, its encoder
sized as `model`'s ViT tower (hidden_size, num_image_layers, num_heads, intermediate_size,
patch_size) and its decoder as `pretrain_vision` says, or continuing the local ViTMAE
checkpoint `pretrain_vision.init_from`. Images are preprocessed by the checkpoint's image
processor if it keeps one, else by the `images` section's transform (size `images.size`,
else `data.image_size`), with the `images` section's training augmentation.

`pretrain_vision.out_dir` is a ready ViTMAE checkpoint, written atomically: the model's
`save_pretrained` and the image processor that preprocesses as training did
(`ViTImageProcessor`, or the checkpoint's). The stage also writes
`<runtime.metrics_dir>/pretrain_vision.json`, `<runtime.plots_dir>/pretrain_vision_loss.csv`
and a reconstruction grid (`vlp.pretrain_vision_report`), and logs the MLflow stage run
`pretrain-vision`: params, every step's loss, one grid per `checkpoint_every` steps and at the end.

Resumable as `pretrain` is: the work folder belongs to one run, and `resume` continues it only
if it was written with the same fingerprint (the params that decide what is learned, the
init checkpoint and processor, the data hash). With `pretrain_vision.enabled: false` nothing
trains: `out_dir` holds only a marker saying so, and the metrics say the same.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from vlp.config import Config
from vlp.errors import ConfigError
from vlp.io import atomic_dir, atomic_write_json, check_replaceable, check_writable
from vlp.pretrain_fingerprint import UNFINGERPRINTED
from vlp.pretrain_report import smoothed_ends
from vlp.pretrain_vision_report import ReconstructionGrid, evenly_spaced, log_grid, write_results
from vlp.train.checkpoint import claim_work_dir, update_run_record
from vlp.train.distributed import DistInfo, barrier, distributed
from vlp.train.loop import train
from vlp.train.settings import TrainResult, TrainSettings, epoch_steps

STAGE = "pretrain-vision"
LOG_FLUSH_STEPS = 50  # per-step metrics reach MLflow in batches of this many steps
DISABLED_FILE = "disabled.json"  # all that `out_dir` holds when the stage is disabled
ENCODER_KEYS = ("hidden_size", "num_image_layers", "num_heads", "intermediate_size", "patch_size")
# where and how often progress is saved or shown, not what is learned: a resume may change them
UNFINGERPRINTED_KEYS = ("enabled", "out_dir", "checkpoint_every", "num_reconstructions")


def work_dir(cfg: Config) -> Path:
    """Checkpoints of an unfinished run; kept outside the stage output."""
    out = Path(cfg.pretrain_vision.out_dir)
    return out.with_name(f"{out.name}.work")


def stage_transform(cfg: Config) -> Any:
    """The evaluation transform: `init_from`'s image processor if it keeps one, else `images`'."""
    from vlp.data.images import ImageTransform
    from vlp.data.processors import ProcessorTransform, has_image_processor

    im, init_from = cfg.images, cfg.pretrain_vision.init_from
    if im.size is not None and (not isinstance(im.size, int) or im.size < 1):
        raise ConfigError(f"images.size: must be a positive integer or null, got {im.size!r}")
    if init_from and has_image_processor(Path(init_from).expanduser()):
        return ProcessorTransform.load(
            Path(init_from).expanduser(), "pretrain_vision.init_from", im.size
        )
    size = im.size if im.size is not None else cfg.data.image_size
    return ImageTransform(size, im.resize, tuple(im.mean), tuple(im.std))


def check_params(cfg: Config) -> None:
    """Refuse bad `pretrain_vision` values and the evaluation split, before anything is written."""
    from vlp.data.manifest import check_split_names

    pv = cfg.pretrain_vision
    if cfg.model.image_tower != "vit":
        raise ConfigError(
            f"pretrain_vision.enabled: true pretrains a ViT image tower, but model.image_tower "
            f"is {cfg.model.image_tower!r}, which pretrain would build without it; set "
            "model.image_tower: vit (or pretrain_vision.enabled: false)"
        )
    check_split_names(pv.splits, "pretrain_vision.splits")
    held_out: dict[str, list[str]] = {}
    for key, split in (
        ("evaluate.split", cfg.evaluate.split),
        ("pretrain.eval_split", cfg.pretrain.eval_split),
    ):
        if split is not None:
            held_out.setdefault(split, []).append(key)
    for split in pv.splits:
        if split in held_out:
            raise ConfigError(
                f"pretrain_vision.splits: {split!r} is the evaluation split "
                f"({' and '.join(held_out[split])}); visual pretraining never sees its images"
            )
    if not 0 <= pv.mask_ratio < 1:
        raise ConfigError(f"pretrain_vision.mask_ratio: must be in [0, 1), got {pv.mask_ratio}")
    for key in (
        "decoder_hidden_size",
        "decoder_num_layers",
        "decoder_num_heads",
        "decoder_intermediate_size",
        "num_reconstructions",
    ):
        if getattr(pv, key) < 1:
            raise ConfigError(f"pretrain_vision.{key}: must be >= 1, got {getattr(pv, key)}")
    if pv.lr <= 0:
        raise ConfigError(f"pretrain_vision.lr: must be > 0, got {pv.lr}")
    for key in ("weight_decay", "warmup_steps"):
        if getattr(pv, key) < 0:
            raise ConfigError(f"pretrain_vision.{key}: must be >= 0, got {getattr(pv, key)}")
    if pv.init_from:
        from vlp.models.mae import check_mae_checkpoint

        check_mae_checkpoint(pv.init_from, "pretrain_vision.init_from")


def fingerprint(cfg: Config, transform: Any) -> dict[str, Any]:
    """What the trained model depends on: the params it trains with, its start and the data."""
    from vlp.data.manifest import dataset_hash
    from vlp.data.processors import ProcessorTransform

    pv = cfg.pretrain_vision
    params: dict[str, Any] = {
        "seed": cfg.seed,
        "data.image_size": cfg.data.image_size,
        **{f"images.{k}": v for k, v in dataclasses.asdict(cfg.images).items()},
        **{f"model.{k}": getattr(cfg.model, k) for k in ENCODER_KEYS},
        **{
            f"pretrain_vision.{k}": v
            for k, v in dataclasses.asdict(pv).items()
            if k not in UNFINGERPRINTED_KEYS
        },
        **{
            key: v
            for k, v in dataclasses.asdict(cfg.runtime).items()
            if (key := f"runtime.{k}") not in UNFINGERPRINTED
        },
    }
    if pv.init_from:
        from vlp.tasks import model_sha256

        params["init_from_sha256"] = model_sha256(Path(pv.init_from).expanduser())
    if isinstance(transform, ProcessorTransform):
        params["image_processor"] = transform.model_files()
    return {"params": params, "data": dataset_hash(cfg.data.root)}


def _settings(cfg: Config) -> TrainSettings:
    """The loop's settings; a bad value is named by its params key."""
    try:
        return TrainSettings.from_config(cfg.runtime, cfg.pretrain_vision, seed=cfg.seed)
    except ConfigError as e:
        key = str(e).split(":")[0]
        own = {f.name for f in dataclasses.fields(cfg.pretrain_vision)}
        raise ConfigError(f"{'pretrain_vision' if key in own else 'runtime'}.{e}") from None


def _check_outputs(cfg: Config, tracked: bool) -> Path:
    """Refuse output folders that cannot be written (and the tracking store); return out_dir."""
    from vlp.tracking import check_stage_outputs

    out_dir = Path(cfg.pretrain_vision.out_dir)
    folders = {
        "pretrain_vision.out_dir": out_dir.parent,  # replaced as a whole: a sibling is built first
        "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
        "runtime.plots_dir": Path(cfg.runtime.plots_dir),
    }
    if tracked:
        check_stage_outputs(cfg, folders)
    else:
        check_writable(folders)
    check_replaceable(out_dir)
    return out_dir


def write_disabled(cfg: Config) -> Path:
    """`pretrain_vision.enabled: false`: `out_dir` with only a marker; metrics say so."""
    out_dir = _check_outputs(cfg, tracked=False)
    with atomic_dir(out_dir, STAGE) as tmp:
        atomic_write_json(tmp / DISABLED_FILE, {"enabled": False})
    write_results(cfg, None, {"enabled": False, "steps": 0}, [], None)
    return out_dir


def collate_pixels(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch of the model's only input: pixel_values [B, 3, H, W]."""
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}


def _model(cfg: Config, image_size: int) -> Any:
    """The masked autoencoder training starts from (the same weights on every rank and run)."""
    from vlp.models.mae import build_mae, load_mae

    pv = cfg.pretrain_vision
    torch.manual_seed(cfg.seed)
    if not pv.init_from:
        return build_mae(cfg.model, pv, image_size)
    print(
        f"{STAGE}: continuing {pv.init_from}: its encoder and decoder sizes are the checkpoint's "
        "(model.* sizes and pretrain_vision.decoder_* are not used)"
    )
    key = "pretrain_vision.init_from"
    return load_mae(pv.init_from, key, image_size, pv.mask_ratio, pv.norm_pix_loss)


def _data(cfg: Config, transform: Any, info: DistInfo, model: Any) -> tuple[Any, Any]:
    """The training images and the reconstruction grid; refuses what cannot fill one step."""
    from vlp.data.decode import fast_decode
    from vlp.data.images import Augmentation
    from vlp.data.torch_data import ImagesDataset
    from vlp.models.mae import check_grid

    pv, im = cfg.pretrain_vision, cfg.images
    augment = Augmentation(tuple(im.train_crop_scale), im.hflip, cfg.seed)
    root = cfg.data.root
    fast = fast_decode(im.fast_decode, training=True)
    dataset = ImagesDataset(
        root, pv.splits, transform, augment if augment.active else None, fast_jpeg=fast
    )
    if epoch_steps(len(dataset), _settings(cfg), info.world_size) == 0:
        raise ConfigError(
            f"pretrain_vision.batch_size * grad_accum_steps = "
            f"{pv.batch_size * pv.grad_accum_steps} is more than the {len(dataset)} images of "
            f"pretrain_vision.splits ({', '.join(pv.splits)}): not one full step fits"
        )
    if pv.num_reconstructions > len(dataset):
        raise ConfigError(
            f"pretrain_vision.num_reconstructions: {pv.num_reconstructions} is more than the "
            f"{len(dataset)} images of pretrain_vision.splits"
        )
    num_patches = check_grid(transform.size, model.config.patch_size, pv.mask_ratio, "images.size")
    plain = ImagesDataset(root, pv.splits, transform)
    picks = evenly_spaced(len(plain), pv.num_reconstructions)
    pixels = torch.stack([plain[i]["pixel_values"] for i in picks])
    return dataset, ReconstructionGrid(pixels, num_patches, cfg.seed, transform)


def _run_params(cfg: Config, transform: Any, model: Any, n_images: int, world: int) -> dict:
    """What the MLflow run records: the sections the stage reads and what it resolved."""
    from vlp.data.images import image_params

    return {
        "seed": cfg.seed,
        "data.image_size": cfg.data.image_size,
        **{f"runtime.{k}": v for k, v in vars(cfg.runtime).items()},
        **{f"pretrain_vision.{k}": v for k, v in vars(cfg.pretrain_vision).items()},
        **{f"model.{k}": getattr(cfg.model, k) for k in ENCODER_KEYS},
        **{f"images.{k}": v for k, v in vars(cfg.images).items()},
        **image_params(transform),
        "num_parameters": model.num_parameters(),
        "n_images": n_images,
        "world_size": world,
    }


def _train(
    model: Any, cfg: Config, run: Any, dataset: Any, grid: ReconstructionGrid, resume: bool
) -> tuple[TrainResult, Any]:
    """Train; log every step's metrics and a grid every `checkpoint_every` steps to `run`.

    Returns the result and the final grid (rank 0; None elsewhere), logged too.
    """
    every = cfg.pretrain_vision.checkpoint_every
    pending: list[tuple[int, dict[str, float]]] = []
    drawn: set[int] = set()

    def on_log(metrics: dict[str, float], step: int) -> None:
        """Buffer the step's metrics for MLflow; draw and log the grid when one is due."""
        pending.append((step, metrics))
        if len(pending) >= LOG_FLUSH_STEPS:
            run.log_steps(pending)
            pending.clear()
        if every > 0 and step % every == 0:
            log_grid(run, grid.draw(model), step)
            drawn.add(step)

    try:
        result = train(
            model,
            dataset,
            collate_pixels,
            _settings(cfg),
            work_dir(cfg),
            resume=resume,
            on_log=on_log if run else None,
        )
    finally:
        if run and pending:
            run.log_steps(pending)  # also when training failed: keep what it logged
    if not run:
        return result, None
    final = grid.draw(model)
    if result.steps not in drawn:
        log_grid(run, final, result.steps)
    return result, final


def _save(model: Any, transform: Any, out_dir: Path) -> None:
    """Write the ready ViTMAE checkpoint: model and image processor, atomically."""
    from vlp.models.mae import image_processor

    with atomic_dir(out_dir, STAGE) as tmp:
        model.save_pretrained(str(tmp))
        image_processor(transform).save_pretrained(str(tmp))


def _summary(result: TrainResult, n_images: int, wall_s: float) -> dict[str, Any]:
    first, last = smoothed_ends(result.history, "loss")
    return {
        "enabled": True,
        "loss_first": first,
        "loss_last": last,
        "loss_final": result.final["loss"],
        "steps": result.steps,
        "n_images": n_images,
        "train_images_per_s": result.samples_per_s,
        "train_s": result.wall_s,
        "wall_s": wall_s,
        "world_size": result.world_size,
    }


def pretrain_vision(cfg: Config, resume: bool = False) -> Path:
    """Run the pretrain-vision stage; return `pretrain_vision.out_dir` (written by rank 0)."""
    from vlp.data.manifest import require_splits
    from vlp.lineage import check_checkpoint_deps

    t0 = time.perf_counter()
    pv = cfg.pretrain_vision
    if not pv.enabled:
        return write_disabled(cfg)
    check_params(cfg)
    check_checkpoint_deps({"pretrain_vision.init_from": pv.init_from})
    require_splits(cfg.data.root, pv.splits, "pretrain_vision.splits", "images")
    transform = stage_transform(cfg)
    out_dir = _check_outputs(cfg, tracked=True)
    with distributed() as info:
        model = _model(cfg, transform.size)
        dataset, grid = _data(cfg, transform, info, model)
        if info.is_main:
            fp = fingerprint(cfg, transform)
            record = claim_work_dir(work_dir(cfg), fp, resume)
        barrier()
        params = _run_params(cfg, transform, model, len(dataset), info.world_size)
        if info.is_main:
            from vlp.tracking import stage_run

            inputs = {"data": (cfg.data.root, fp["data"])}
            if pv.init_from:
                inputs["pretrain_vision.init_from"] = (
                    pv.init_from,
                    fp["params"]["init_from_sha256"],
                )
            resumes = record.get("mlflow_run_id")
            run_ctx = stage_run(cfg, STAGE, params=params, resumes=resumes, inputs=inputs)
        else:
            run_ctx = nullcontext(None)
        with run_ctx as run:
            if run:
                update_run_record(work_dir(cfg), mlflow_run_id=run.run_id)
            result, final_grid = _train(model, cfg, run, dataset, grid, resume)
            if info.is_main:
                _save(model, transform, out_dir)
                run.set_tags({"vlp.device": result.device, "vlp.precision": result.precision})
                metrics = _summary(result, len(dataset), time.perf_counter() - t0)
                write_results(cfg, run, metrics, result.history, final_grid)
        barrier()
    return out_dir
