"""The `pretrain` stage: tokenizer + VLP model trained with ITC, ITM and captioning LM.

Reads the pairs of `pretrain.splits` of `data.root`, writes the model (`save_pretrained`)
to `pretrain.out_dir`, `<runtime.metrics_dir>/pretrain.json` (loss start/end, zero-shot
retrieval on `pretrain.eval_split` against chance, throughput) and
`<runtime.plots_dir>/pretrain_loss.csv`, and logs an MLflow stage run with every step's
losses. Splits with no data and batch sizes that cannot fill one step are refused before
anything trains. The zero-shot check is optional: with no eval split, or no data in it, the
model is saved and the metrics say the check was skipped.

With `pretrain.caption_warmup_steps` > 0 (the shapes recipe) a captioning-only phase comes
first: the LM alone, on each image's first caption. One caption per image, always the same, gives the
decoder a fixed target to read the image for, and the image tower learns what the objects
are several times faster than from all captions with all objectives. The joint ITC + ITM +
LM phase then starts from that model. The loss curve and the MLflow run hold both phases,
the warm-up's steps first; the `loss_*_first/last` metrics are the joint phase's.

The work folder (`work_dir`: both phases' checkpoints, the tokenizer) belongs to one run:
a fresh run empties it before anything trains, and `resume` continues it only if it was
written with the same `fingerprint` (training params and data hash); the resumed MLflow
run is linked to the interrupted one.

With `model.init_from` (a vlp model directory or a transformers BLIP checkpoint, see
`init_model`) training starts from that model's weights and tokenizer instead of fresh ones,
and the checkpoint's image processor is saved beside the model. With `pretrain.enabled:
false` nothing trains: `model.init_from` is saved as the pretrained model, in the same
layout, and scored zero-shot (`save_init_from`).

Under `torchrun` rank 0 does all file I/O and logging; training is data parallel across
ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from vlp.config import Config
from vlp.errors import ConfigError
from vlp.io import atomic_write_csv, atomic_write_json, check_replaceable
from vlp.models.objectives import ObjectiveWeights, VLPObjective
from vlp.train.checkpoint import claim_work_dir, update_run_record
from vlp.train.distributed import DistInfo, barrier, distributed
from vlp.train.loop import TrainResult, TrainSettings, epoch_steps, train

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")
PLOT_COLUMNS = ("step", *LOSS_KEYS, "lr")
LOG_FLUSH_STEPS = 50  # per-step metrics reach MLflow in batches of this many steps
# params that decide where and how often progress is saved or shown, not what is learned:
# a resumed run may change them.
UNFINGERPRINTED = (
    "pretrain.out_dir",
    "pretrain.checkpoint_every",
    "pretrain.eval_split",
    "pretrain.eval_batch_size",
    "runtime.log_every",
    "runtime.metrics_dir",
    "runtime.plots_dir",
    "runtime.local_loss",
    "runtime.gradient_checkpointing",
)
CAPTION_WARMUP_WEIGHTS = ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0)
# The pretrained model's evaluation transform (`to_dict`: size, resize, mean/std, or the image
# processor file saved beside it), beside its weights.
IMAGE_TRANSFORM_FILE = "image_transform.json"


def work_dir(cfg: Config) -> Path:
    """Checkpoints and the tokenizer of an unfinished run; kept outside the stage output."""
    out = Path(cfg.pretrain.out_dir)
    return out.with_name(f"{out.name}.work")


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What the trained model depends on: the params this stage trains with and the data hash.

    With a pretrained image processor, the processor as resolved (its settings at the size
    used) too: editing the checkpoint's processor changes what is learned.
    """
    from vlp.data.images import ProcessorTransform, image_transforms
    from vlp.data.manifest import dataset_hash

    params = {
        "seed": cfg.seed,
        "data.image_size": cfg.data.image_size,
        **{f"images.{k}": v for k, v in dataclasses.asdict(cfg.images).items()},
        **{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
        **{
            key: v
            for section in ("runtime", "pretrain")
            for k, v in dataclasses.asdict(getattr(cfg, section)).items()
            if (key := f"{section}.{k}") not in UNFINGERPRINTED
        },
    }
    transform = image_transforms(cfg)[0]
    if isinstance(transform, ProcessorTransform):
        params["image_processor"] = transform.model_files()
    if cfg.data.shards is not None:  # the stream trained on: its shards, by their index
        from vlp.data.shards import INDEX_FILE

        params["data.shuffle_buffer"] = cfg.data.shuffle_buffer
        index = (Path(cfg.data.shards) / INDEX_FILE).read_bytes()
        params["data.shards"] = hashlib.sha256(index).hexdigest()
    return {"params": params, "data": dataset_hash(cfg.data.root)}


def corpus(data_dir: Path, splits: list[str]) -> list[str]:
    """Texts the tokenizer learns: the captions, VQA questions and VQA answers of `splits`.

    `pretrain.tokenizer_splits` names the training text of every stage, so every finetuning
    task shares the vocabulary.
    """
    from vlp.data.manifest import has_vqa, read_pairs, read_vqa

    texts = list(read_pairs(data_dir, splits)["caption"])
    if has_vqa(data_dir):
        vqa = read_vqa(data_dir, splits)
        texts += list(vqa["question"])
        texts += [a for answers in vqa["answers"] for a in answers]
    return texts


def _tokenizer(cfg: Config, info: DistInfo, resume: bool) -> Any:
    """Rank 0 trains (or loads) the tokenizer and saves it; the other ranks load that copy."""
    from vlp.models import build_tokenizer, load_tokenizer, save_tokenizer

    saved = work_dir(cfg) / "tokenizer"
    if info.is_main:
        if resume and saved.is_dir():
            tok = load_tokenizer(saved, str(saved))
        else:
            tok = build_tokenizer(
                cfg.model, corpus(Path(cfg.data.root), cfg.pretrain.tokenizer_splits)
            )
            save_tokenizer(tok, saved)
    barrier()
    return tok if info.is_main else load_tokenizer(saved, str(saved))


def smoothed_ends(history: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last 10% of steps (at least one step each)."""
    values = [h[key] for h in history if key in h]
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


@torch.no_grad()
def zero_shot_retrieval(model: Any, cfg: Config, split: str) -> dict[str, float]:
    """ITC-only retrieval on `split` (R@1/5/10 both ways, VSE++ protocol) and chance levels."""
    from torch.utils.data import DataLoader

    from vlp.data.images import image_transforms
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import ImagesDataset, collate
    from vlp.metrics.retrieval import recall_at_k
    from vlp.models.embed import embed_texts, encode_images

    model.eval()
    images = ImagesDataset(cfg.data.root, split, image_transforms(cfg)[0])
    loader = DataLoader(images, batch_size=cfg.pretrain.eval_batch_size, collate_fn=collate)
    image_feat = encode_images(model, (batch["pixel_values"] for batch in loader))[1]
    pairs = read_pairs(cfg.data.root, split)
    index = {image_id: i for i, image_id in enumerate(images.image_ids)}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    captions = list(pairs["caption"])
    text_feat = embed_texts(model, captions, cfg.pretrain.eval_batch_size)
    scores = recall_at_k((image_feat @ text_feat.t()).float().cpu(), text_to_image)
    n_img, n_txt = len(images), len(captions)
    per_image = n_txt / n_img
    for k in (1, 5, 10):
        # a random ranking finds the image in the top k with chance k/n; an image finds
        # one of its ~per_image captions in the top k with chance ~k*per_image/n_txt
        scores[f"chance_t2i_R@{k}"] = 100.0 * min(k, n_img) / n_img
        scores[f"chance_i2t_R@{k}"] = 100.0 * min(1.0, k * per_image / n_txt)
    scores.update(n_images=float(n_img), n_texts=float(n_txt))
    return scores


def zero_shot_skipped(cfg: Config) -> str | None:
    """Why the zero-shot check after training cannot run (no eval split, or no data), or None."""
    from vlp.data.manifest import split_sizes

    split = cfg.pretrain.eval_split
    if split is None:
        return "skipped: pretrain.eval_split is null"
    if not split_sizes(cfg.data.root).get(split):
        return f"skipped: no {split!r} split in {cfg.data.root}"
    return None


def _check_batches_fit(
    n: int, what: str, settings: TrainSettings, world_size: int, remedy: str
) -> None:
    """ConfigError naming both numbers when `n` items cannot fill one optimizer step."""
    if epoch_steps(n, settings, world_size) == 0:
        raise ConfigError(
            f"pretrain.batch_size * grad_accum_steps = "
            f"{settings.batch_size * settings.grad_accum_steps} is more than the {n} {what}: "
            f"not one full step fits; {remedy}"
        )


def _summary(
    result: TrainResult,
    zero_shot: dict[str, float] | str,
    wall_s: float,
    warmup: TrainResult | None = None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if warmup is not None:
        first, last = smoothed_ends(warmup.history, "loss_lm")
        metrics.update(
            caption_warmup_steps=warmup.steps,
            caption_warmup_s=warmup.wall_s,
            caption_warmup_loss_lm_first=first,
            caption_warmup_loss_lm_last=last,
        )
    for key in LOSS_KEYS:
        if any(key in h for h in result.history):
            first, last = smoothed_ends(result.history, key)
            metrics[f"{key}_first"], metrics[f"{key}_last"] = first, last
    if isinstance(zero_shot, str):
        metrics["zero_shot"] = zero_shot
    else:
        metrics.update({f"zeroshot_{k}": v for k, v in zero_shot.items()})
    metrics.update(
        steps=result.steps,
        train_samples_per_s=result.samples_per_s,
        train_s=result.wall_s,
        wall_s=wall_s,
        world_size=result.world_size,
    )
    return metrics


def init_source(cfg: Config) -> tuple[Path, str]:
    """(`model.init_from`, its kind): "vlp" (a vlp model directory) or "blip" (transformers BLIP).

    Anything else is a ConfigError naming `model.init_from`.
    """
    from vlp.models.blip import blip_architecture
    from vlp.models.tokenizer import local_dir
    from vlp.models.vlp_model import CONFIG_NAME

    path = local_dir(cfg.model.init_from, "model.init_from")
    if (path / CONFIG_NAME).is_file():
        return path, "vlp"
    if blip_architecture(path) is not None:
        return path, "blip"
    model_type = checkpoint_model_type(path)
    if model_type == "clip":
        # The clip family (`vlp.models.clip.CLIPDualEncoder`, model.family: clip) loads here.
        raise ConfigError(
            f"model.init_from: {path} holds a CLIP model; the clip family cannot load it yet"
        )
    raise ConfigError(
        f"model.init_from: {path} holds neither a vlp model ({CONFIG_NAME}) nor a transformers "
        f"BLIP checkpoint (config.json model_type 'blip'); its model type: {model_type!r}"
    )


def init_model(cfg: Config) -> Any:
    """The model `model.init_from` holds (`init_source`), with its weights and tokenizer.

    Seed torch first: parts a BLIP class lacks are initialised randomly (`vlp.models.blip`).
    """
    from vlp.models.blip import load_blip
    from vlp.models.vlp_model import VLPModel

    path, kind = init_source(cfg)
    if kind == "vlp":
        return VLPModel.from_pretrained(path)
    return load_blip(path, cfg.model, cfg.pretrain.temperature)


def checkpoint_model_type(path: Path) -> str | None:
    """`model_type` of the transformers config.json in `path`, or None without one."""
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from: cannot read {config}: {e}") from e


def save_init_from(cfg: Config) -> Path:
    """`pretrain.enabled: false`: save `model.init_from` as the pretrained model, untrained.

    Writes what a trained run writes (the model at `pretrain.out_dir`, metrics with the
    zero-shot retrieval check, a loss curve with no steps) and an MLflow stage run whose
    params say `pretrain.enabled: false` and whose `vlp.init_from` tag names the checkpoint.
    """
    from vlp.data.images import image_transforms
    from vlp.data.manifest import check_split_names
    from vlp.tracking import check_stage_outputs, stage_run
    from vlp.train.loop import resolve_device

    t0 = time.perf_counter()
    p = cfg.pretrain
    if not cfg.model.init_from:
        raise ConfigError(
            "pretrain.enabled is false but model.init_from is not set: set model.init_from to "
            "the checkpoint directory to use as the pretrained model, or pretrain.enabled: true"
        )
    init_source(cfg)
    if p.eval_split is not None:
        check_split_names(p.eval_split, "pretrain.eval_split")
    out_dir = Path(p.out_dir)
    check_stage_outputs(
        cfg,
        {
            "pretrain.out_dir": out_dir.parent,
            "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
            "runtime.plots_dir": Path(cfg.runtime.plots_dir),
        },
    )
    with distributed() as info:
        if info.is_main:
            check_replaceable(out_dir)
            torch.manual_seed(cfg.seed)
            model = init_model(cfg)
            transform = image_transforms(cfg)[0]
            params = {
                **{f"runtime.{k}": v for k, v in vars(cfg.runtime).items()},
                **{f"pretrain.{k}": v for k, v in vars(p).items()},
                **{f"model.{k}": v for k, v in vars(cfg.model).items()},
                **{f"images.{k}": v for k, v in vars(cfg.images).items()},
                "num_parameters": model.num_parameters(),
            }
            tags = {"vlp.init_from": str(cfg.model.init_from)}
            with stage_run(cfg, "pretrain", params=params, tags=tags) as run:
                model.save_pretrained(
                    out_dir, {IMAGE_TRANSFORM_FILE: transform.to_dict(), **transform.model_files()}
                )
                skipped = zero_shot_skipped(cfg)
                if skipped is None:
                    model.to(resolve_device(cfg.runtime.device, info))
                    zero_shot: dict[str, float] | str = zero_shot_retrieval(
                        model, cfg, p.eval_split
                    )
                else:
                    print(f"pretrain: zero-shot retrieval {skipped}")
                    zero_shot = skipped
                metrics: dict[str, Any] = {"init_from": str(cfg.model.init_from), "steps": 0}
                if isinstance(zero_shot, str):
                    metrics["zero_shot"] = zero_shot
                    run.set_tags({"vlp.zero_shot": zero_shot})
                else:
                    metrics.update({f"zeroshot_{k}": v for k, v in zero_shot.items()})
                metrics["wall_s"] = time.perf_counter() - t0
                metrics_path = Path(cfg.runtime.metrics_dir) / "pretrain.json"
                plot_path = Path(cfg.runtime.plots_dir) / "pretrain_loss.csv"
                atomic_write_json(metrics_path, metrics)
                atomic_write_csv(plot_path, PLOT_COLUMNS, [])  # nothing trained
                run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
                run.log_artifact(metrics_path)
                run.log_artifact(plot_path)
                print(json.dumps(metrics, indent=2))
        barrier()
    return out_dir


def pretrain(cfg: Config, resume: bool = False) -> Path:
    """Run the pretrain stage; return `pretrain.out_dir` (written atomically by rank 0)."""
    from vlp.data.images import image_params, image_transforms
    from vlp.data.manifest import check_split_names, require_splits
    from vlp.data.shards import pairs_for_training
    from vlp.data.torch_data import make_pretrain_collate
    from vlp.models import build_model
    from vlp.tracking import check_stage_outputs

    t0 = time.perf_counter()
    p = cfg.pretrain
    if not p.enabled:
        return save_init_from(cfg)
    if cfg.model.init_from:
        init_source(cfg)  # a bad checkpoint is refused before anything is written
    if p.caption_warmup_steps < 0:
        raise ConfigError(
            f"pretrain.caption_warmup_steps: must be >= 0, got {p.caption_warmup_steps}"
        )
    try:
        joint_weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    except ConfigError as e:
        raise ConfigError(f"pretrain.itc_weight/itm_weight/lm_weight: {e}") from None
    require_splits(cfg.data.root, p.splits, "pretrain.splits")
    require_splits(cfg.data.root, p.tokenizer_splits, "pretrain.tokenizer_splits")
    if p.eval_split is not None:
        check_split_names(p.eval_split, "pretrain.eval_split")
    out_dir = Path(p.out_dir)
    check_stage_outputs(
        cfg,
        {
            "pretrain.out_dir": out_dir.parent,  # replaced as a whole: a sibling is built first
            "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
            "runtime.plots_dir": Path(cfg.runtime.plots_dir),
        },
    )
    with distributed() as info:
        if info.is_main:  # refuse a foreign output folder before training, not after
            check_replaceable(out_dir)
        splits = ", ".join(p.splits)
        transform, augment = image_transforms(cfg)
        stream = {"seed": cfg.seed, "shuffle_buffer": cfg.data.shuffle_buffer}
        dataset = pairs_for_training(
            cfg.data.root, cfg.data.shards, p.splits, transform, augment, **stream
        )
        settings = TrainSettings.from_config(cfg.runtime, p, seed=cfg.seed)
        _check_batches_fit(
            len(dataset),
            f"pairs of pretrain.splits ({splits})",
            settings,
            info.world_size,
            "lower pretrain.batch_size",
        )
        firsts = None
        if p.caption_warmup_steps > 0:
            firsts = pairs_for_training(
                cfg.data.root,
                cfg.data.shards,
                p.splits,
                transform,
                augment,
                **stream,
                first_caption_only=True,
            )
            warmup_settings = TrainSettings.from_config(
                cfg.runtime, p, seed=cfg.seed, max_steps=p.caption_warmup_steps
            )
            _check_batches_fit(
                len(firsts),
                f"images of pretrain.splits ({splits}) the caption warm-up trains on "
                "(one caption per image)",
                warmup_settings,
                info.world_size,
                "lower pretrain.batch_size, or set pretrain.caption_warmup_steps: 0 "
                "(the warm-up is a recipe for the shapes world)",
            )
        if info.is_main:
            record = claim_work_dir(work_dir(cfg), fingerprint(cfg), resume)
        barrier()
        if cfg.model.init_from:  # the checkpoint's weights and tokenizer
            torch.manual_seed(cfg.seed)  # parts it lacks start alike on every rank and run
            model = init_model(cfg)
            tokenizer = model.tokenizer
        else:
            tokenizer = _tokenizer(cfg, info, resume)
            torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
            model = build_model(cfg.model, tokenizer, temperature=p.temperature)
        collate = make_pretrain_collate(tokenizer, model.cfg.max_text_length)

        params = {
            **{f"runtime.{k}": v for k, v in vars(cfg.runtime).items()},
            **{f"pretrain.{k}": v for k, v in vars(p).items()},
            **{f"model.{k}": v for k, v in vars(cfg.model).items()},
            **{f"images.{k}": v for k, v in vars(cfg.images).items()},
            **image_params(transform),
            "num_parameters": model.num_parameters(),
            "n_pairs": len(dataset),
            "world_size": info.world_size,
        }
        if info.is_main:
            from vlp.tracking import stage_run

            run_ctx = stage_run(cfg, "pretrain", params=params, resumes=record.get("mlflow_run_id"))
        else:
            run_ctx = nullcontext(None)
        with run_ctx as run:
            if run:
                # the run a later --resume marks as interrupted and links to its own
                update_run_record(work_dir(cfg), mlflow_run_id=run.run_id)
            pending: list[tuple[int, dict[str, float]]] = []
            offset = 0  # MLflow steps continue across the two phases

            def on_log(metrics: dict[str, float], step: int) -> None:
                pending.append((offset + step, metrics))
                if len(pending) >= LOG_FLUSH_STEPS:
                    run.log_steps(pending)
                    pending.clear()

            warmup: TrainResult | None = None
            try:
                if firsts is not None:
                    warmup = train(
                        VLPObjective(
                            model, CAPTION_WARMUP_WEIGHTS, local_loss=cfg.runtime.local_loss
                        ),
                        firsts,
                        collate,
                        warmup_settings,
                        work_dir(cfg) / "caption_warmup",
                        resume=resume,
                        on_log=on_log if run else None,
                    )
                    offset = warmup.steps
                result = train(
                    VLPObjective(model, joint_weights, local_loss=cfg.runtime.local_loss),
                    dataset,
                    collate,
                    settings,
                    work_dir(cfg),
                    resume=resume,
                    on_log=on_log if run else None,
                )
            finally:
                if run and pending:
                    run.log_steps(pending)  # also when training failed: keep what it logged
            if info.is_main:
                # saved first: the zero-shot check is optional and never costs the model
                model.save_pretrained(
                    out_dir, {IMAGE_TRANSFORM_FILE: transform.to_dict(), **transform.model_files()}
                )
                skipped = zero_shot_skipped(cfg)
                if skipped is None:
                    zero_shot: dict[str, float] | str = zero_shot_retrieval(
                        model, cfg, p.eval_split
                    )
                else:
                    print(f"pretrain: zero-shot retrieval {skipped}")
                    zero_shot = skipped
                metrics = _summary(result, zero_shot, time.perf_counter() - t0, warmup)
                history = result.history
                if warmup is not None:
                    history = warmup.history + [
                        {**h, "step": warmup.steps + h["step"]} for h in result.history
                    ]
                metrics_path = Path(cfg.runtime.metrics_dir) / "pretrain.json"
                plot_path = Path(cfg.runtime.plots_dir) / "pretrain_loss.csv"
                atomic_write_json(metrics_path, metrics)
                atomic_write_csv(plot_path, PLOT_COLUMNS, history)
                run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
                run.set_tags({"vlp.device": result.device, "vlp.precision": result.precision})
                if skipped is not None:
                    run.set_tags({"vlp.zero_shot": skipped})
                run.log_artifact(metrics_path)
                run.log_artifact(plot_path)
                print(json.dumps(metrics, indent=2))
        barrier()
    return out_dir
