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

With `pretrain.patch_dropout` > 0 (FLIP, docs/flip.md) the joint phase's image tower
(vit, clip, or BLIP's) sees a random `patch_dropout` of each image's patches dropped in
training, until its last `pretrain.unmasked_steps` steps, which see them all; the caption
warm-up and the zero-shot check always see every patch.

With `model.family: clip` the model is a dual encoder (`vlp.models.clip`): from scratch
(sized by `model`, with the trained tokenizer) or from the CLIPModel directory
`model.init_from` (with its own tokenizer); it trains CLIP's contrastive loss alone, weighted
`pretrain.itc_weight`. `itm_weight` and `lm_weight` do not apply to it (a note says so when
they are non-zero) and neither does the caption warm-up, which it skips.

With `model.family: encoder-decoder` (transformers' `VisionEncoderDecoderModel`, a ViT read by
GPT-2) or `t5` (image tokens in a T5 encoder-decoder) the model trains the captioning LM
alone, weighted `pretrain.lm_weight`, caption warm-up included; it has no contrastive
embeddings, so the zero-shot check is skipped (docs/generative-families.md).

The work folder (`work_dir`: both phases' checkpoints, the tokenizer) belongs to one run:
a fresh run empties it before anything trains, and `resume` continues it only if it was
written with the same `fingerprint` (training params and data hash); the resumed MLflow
run is linked to the interrupted one. The MLflow run records what it read by content hash
(`read_inputs`): the dataset, its shards' index, and any checkpoint directory it starts from.

With `pretrain_vision.enabled` the ViT image tower starts from the masked autoencoder the
`pretrain-vision` stage trained (`vlp.vision_init.with_mae_tower`), as if
`model.image_pretrained` named `pretrain_vision.out_dir`; its image processor is saved beside
the model.

With `model.init_from` (a vlp model directory, a transformers BLIP or CLIPModel checkpoint,
see `vlp.models.family.build_from_params`) training starts from that model's weights and tokenizer instead of fresh ones,
and the checkpoint's image processor is saved beside the model. With `pretrain.enabled:
false` nothing trains: `model.init_from` is saved as the pretrained model, in the same
layout, and scored zero-shot (`save_init_from`).

Under `torchrun` rank 0 does all file I/O and logging; training is data parallel across
ranks. The zero-shot check and the metrics are `vlp.pretrain_report`'s; the fingerprint and
the work folder, `vlp.pretrain_fingerprint`'s.
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
from vlp.io import check_replaceable
from vlp.models.objectives import ObjectiveWeights
from vlp.pretrain_fingerprint import check_checkpoint_deps, fingerprint, read_inputs, work_dir
from vlp.pretrain_report import save_and_check, summary, write_results, zero_shot_metrics
from vlp.train.checkpoint import claim_work_dir, update_run_record
from vlp.train.distributed import DistInfo, barrier, distributed
from vlp.train.loop import train
from vlp.train.settings import PatchDropout, TrainResult, TrainSettings, epoch_steps
from vlp.vision_init import with_mae_tower

PATCHLESS_TOWERS = ("cnn", "convnext")  # image towers with no patch tokens to drop
LOG_FLUSH_STEPS = 50  # per-step metrics reach MLflow in batches of this many steps
CAPTION_WARMUP_WEIGHTS = ObjectiveWeights(itc=0.0, itm=0.0, lm=1.0)


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
    from vlp.models import build_tokenizer, save_tokenizer
    from vlp.models.family import get_family

    # each family reads a tokenizer its own way (clip keeps one as saved: no BLIP tokens added)
    load = get_family(cfg.model.family).impl().load_tokenizer
    saved = work_dir(cfg) / "tokenizer"
    if info.is_main:
        if resume and saved.is_dir():
            tok = load(saved, str(saved))
        elif cfg.model.tokenizer_pretrained:
            tok = load(cfg.model.tokenizer_pretrained, "model.tokenizer_pretrained")
            save_tokenizer(tok, saved)
        else:
            tok = build_tokenizer(
                cfg.model, corpus(Path(cfg.data.root), cfg.pretrain.tokenizer_splits), load
            )
            save_tokenizer(tok, saved)
    barrier()
    return tok if info.is_main else load(saved, str(saved))


def _family_notes(family: Any, p: Any) -> list[str]:
    """What the model family ignores of the pretrain section, as notes for the log."""
    notes = []
    ignored = [
        f"pretrain.{k}_weight"
        for k in ("itc", "itm", "lm")
        if k not in family.objectives and getattr(p, f"{k}_weight") != 0
    ]
    if ignored:
        trained = " and ".join(f"pretrain.{k}_weight" for k in family.objectives)
        notes.append(
            f"{' and '.join(ignored)} ignored: the {family.name} family trains {trained} alone"
        )
    if p.caption_warmup_steps > 0 and "lm" not in family.objectives:
        notes.append(
            f"pretrain.caption_warmup_steps ignored: the {family.name} family has no decoder"
        )
    return notes


def _objective(model: Any, cfg: Config, weights: ObjectiveWeights) -> Any:
    """What `weights` train of the model, as its family trains them (`Family.objectives`)."""
    from vlp.models.family import get_family

    impl = get_family(cfg.model.family).impl()
    return impl.objective(model, weights, cfg.runtime.local_loss)


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


def _check_outputs(cfg: Config) -> Path:
    """Refuse output paths outside the workspace or dvc.yaml's outs; return `pretrain.out_dir`."""
    from vlp.tracking import check_stage_outputs

    out_dir = Path(cfg.pretrain.out_dir)
    check_stage_outputs(
        cfg,
        {
            "pretrain.out_dir": out_dir.parent,  # replaced as a whole: a sibling is built first
            "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
            "runtime.plots_dir": Path(cfg.runtime.plots_dir),
        },
    )
    return out_dir


def _run_params(cfg: Config) -> dict[str, Any]:
    """The config sections the stage reads, as MLflow params."""
    return {
        **{f"runtime.{k}": v for k, v in vars(cfg.runtime).items()},
        **{f"pretrain.{k}": v for k, v in vars(cfg.pretrain).items()},
        "pretrain_vision.enabled": cfg.pretrain_vision.enabled,
        **{f"model.{k}": v for k, v in vars(cfg.model).items()},
        **{f"images.{k}": v for k, v in vars(cfg.images).items()},
    }


def save_init_from(cfg: Config) -> Path:
    """`pretrain.enabled: false`: save `model.init_from` as the pretrained model, untrained.

    Writes what a trained run writes (the model at `pretrain.out_dir`, metrics with the
    zero-shot retrieval check, a loss curve with no steps) and an MLflow stage run whose
    params say `pretrain.enabled: false` and whose `vlp.init_from` tag names the checkpoint.
    """
    from vlp.data.images import image_transforms
    from vlp.data.manifest import check_split_names, dataset_hash
    from vlp.models.family import build_from_params, check_init_from
    from vlp.tracking import stage_run

    t0 = time.perf_counter()
    p = cfg.pretrain
    if not cfg.model.init_from:
        raise ConfigError(
            "pretrain.enabled is false but model.init_from is not set: set model.init_from to "
            "the checkpoint directory to use as the pretrained model, or pretrain.enabled: true"
        )
    check_init_from(cfg.model)
    if p.eval_split is not None:
        check_split_names(p.eval_split, "pretrain.eval_split")
    out_dir = _check_outputs(cfg)
    with distributed() as info:
        if info.is_main:
            check_replaceable(out_dir)
            torch.manual_seed(cfg.seed)
            model = build_from_params(cfg.model, None, cfg.model.temperature)
            transform = image_transforms(cfg)[0]
            params = {**_run_params(cfg), "num_parameters": model.num_parameters()}
            tags = {"vlp.init_from": str(cfg.model.init_from)}
            inputs = read_inputs(cfg, dataset_hash(cfg.data.root))
            with stage_run(cfg, "pretrain", params=params, tags=tags, inputs=inputs) as run:
                zero_shot = save_and_check(model, cfg, transform, info, untrained=True)
                metrics: dict[str, Any] = {"init_from": str(cfg.model.init_from), "steps": 0}
                metrics.update(zero_shot_metrics(zero_shot))
                metrics["wall_s"] = time.perf_counter() - t0
                write_results(cfg, run, metrics, [])  # nothing trained: a curve with no steps
        barrier()
    return out_dir


def _joint_weights(cfg: Config, family: Any) -> ObjectiveWeights:
    """The joint phase's objective weights, checked with the rest of the pretrain section."""
    p = cfg.pretrain
    if p.caption_warmup_steps < 0:
        raise ConfigError(
            f"pretrain.caption_warmup_steps: must be >= 0, got {p.caption_warmup_steps}"
        )
    try:
        weights = ObjectiveWeights(itc=p.itc_weight, itm=p.itm_weight, lm=p.lm_weight)
    except ConfigError as e:
        raise ConfigError(f"pretrain.itc_weight/itm_weight/lm_weight: {e}") from None
    if not any(getattr(p, f"{k}_weight") != 0 for k in family.objectives):
        trained = " and ".join(f"pretrain.{k}_weight" for k in family.objectives)
        raise ConfigError(f"{trained}: 0, but the {family.name} family trains no other objective")
    return weights


def _masking(cfg: Config) -> PatchDropout | None:
    """The joint phase's patch dropout (FLIP), checked; None when it drops nothing."""
    p = cfg.pretrain
    if not 0 <= p.patch_dropout < 1:
        raise ConfigError(f"pretrain.patch_dropout: must be in [0, 1), got {p.patch_dropout}")
    if p.unmasked_steps < 0:
        raise ConfigError(f"pretrain.unmasked_steps: must be >= 0, got {p.unmasked_steps}")
    if p.patch_dropout > 0 and cfg.model.image_tower in PATCHLESS_TOWERS:
        raise ConfigError(
            f"pretrain.patch_dropout: {p.patch_dropout}, but model.image_tower "
            f"{cfg.model.image_tower!r} has no patch tokens to drop (use vit or clip, or 0)"
        )
    if p.patch_dropout == 0:
        return None
    return PatchDropout(rate=p.patch_dropout, unmasked_steps=p.unmasked_steps)


@dataclasses.dataclass
class _Phase:
    """What one training phase reads: its pairs and its settings."""

    dataset: Any
    settings: TrainSettings


def _phases(
    cfg: Config, family: Any, info: DistInfo, transform: Any, augment: Any
) -> tuple[_Phase | None, _Phase]:
    """The caption warm-up's data (None when it does not run) and the joint phase's.

    Refuses batch sizes that cannot fill one optimizer step of either phase.
    """
    from vlp.data.decode import fast_decode
    from vlp.data.shard_stream import pairs_for_training

    p = cfg.pretrain
    splits = ", ".join(p.splits)
    stream = {
        "seed": cfg.seed,
        "shuffle_buffer": cfg.data.shuffle_buffer,
        "fast_jpeg": fast_decode(cfg.images.fast_decode, training=True),
    }
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
    if info.is_main:
        for note in _family_notes(family, p):
            print(f"pretrain: {note}")
    if not (p.caption_warmup_steps > 0 and "lm" in family.objectives):
        return None, _Phase(dataset, settings)
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
    return _Phase(firsts, warmup_settings), _Phase(dataset, settings)


def _train_phases(
    model: Any,
    cfg: Config,
    run: Any,
    warmup_phase: _Phase | None,
    joint: _Phase,
    joint_weights: ObjectiveWeights,
    resume: bool,
) -> tuple[TrainResult | None, TrainResult]:
    """Train the caption warm-up (if any), then the joint phase; log every step to `run`.

    Only the joint phase drops patches (`pretrain.patch_dropout`): the warm-up's one fixed
    caption per image names every object, and it should see them all.
    """
    from vlp.data.torch_data import make_pretrain_collate

    collate = make_pretrain_collate(model.tokenizer, model.cfg.max_text_length)
    pending: list[tuple[int, dict[str, float]]] = []
    offset = 0  # MLflow steps continue across the two phases

    def on_log(metrics: dict[str, float], step: int) -> None:
        pending.append((offset + step, metrics))
        if len(pending) >= LOG_FLUSH_STEPS:
            run.log_steps(pending)
            pending.clear()

    warmup: TrainResult | None = None
    try:
        if warmup_phase is not None:
            warmup = train(
                _objective(model, cfg, CAPTION_WARMUP_WEIGHTS),
                warmup_phase.dataset,
                collate,
                warmup_phase.settings,
                work_dir(cfg) / "caption_warmup",
                resume=resume,
                on_log=on_log if run else None,
            )
            offset = warmup.steps
        result = train(
            _objective(model, cfg, joint_weights),
            joint.dataset,
            collate,
            joint.settings,
            work_dir(cfg),
            resume=resume,
            on_log=on_log if run else None,
            masking=_masking(cfg),
        )
    finally:
        if run and pending:
            run.log_steps(pending)  # also when training failed: keep what it logged
    return warmup, result


def _loss_curve(result: TrainResult, warmup: TrainResult | None) -> list[dict[str, float]]:
    """Both phases' steps, the warm-up's first, numbered on from one to the other."""
    if warmup is None:
        return result.history
    return warmup.history + [{**h, "step": warmup.steps + h["step"]} for h in result.history]


def pretrain(cfg: Config, resume: bool = False) -> Path:
    """Run the pretrain stage; return `pretrain.out_dir` (written atomically by rank 0)."""
    from vlp.data.images import image_params, image_transforms
    from vlp.data.manifest import check_split_names, require_splits
    from vlp.models.family import build_from_params, check_init_from, get_family

    t0 = time.perf_counter()
    p = cfg.pretrain
    check_checkpoint_deps(cfg)  # DVC reruns the stage when the checkpoints it reads change
    # the model as built: its ViT starts from pretrain_vision.out_dir when MAE ran
    built = with_mae_tower(cfg)
    if not p.enabled:
        return save_init_from(cfg)
    if cfg.model.init_from:
        check_init_from(cfg.model)  # a bad checkpoint is refused before anything is written
    family = get_family(cfg.model.family)
    joint_weights = _joint_weights(cfg, family)
    _masking(cfg)  # a bad patch dropout is refused before anything is written
    require_splits(cfg.data.root, p.splits, "pretrain.splits")
    require_splits(cfg.data.root, p.tokenizer_splits, "pretrain.tokenizer_splits")
    if p.eval_split is not None:
        check_split_names(p.eval_split, "pretrain.eval_split")
    out_dir = _check_outputs(cfg)
    with distributed() as info:
        if info.is_main:  # refuse a foreign output folder before training, not after
            check_replaceable(out_dir)
        transform, augment = image_transforms(built)
        warmup_phase, joint = _phases(cfg, family, info, transform, augment)
        if info.is_main:
            fp = fingerprint(cfg)
            record = claim_work_dir(work_dir(cfg), fp, resume)
            inputs = read_inputs(cfg, fp["data"], fp["params"].get("data.shards"))
        barrier()
        # a checkpoint (model.init_from) brings its weights and its own tokenizer
        tokenizer = None if cfg.model.init_from else _tokenizer(cfg, info, resume)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
        model = build_from_params(built.model, tokenizer, temperature=cfg.model.temperature)
        params = {
            **_run_params(cfg),
            **image_params(transform),
            "num_parameters": model.num_parameters(),
            "n_pairs": len(joint.dataset),
            "world_size": info.world_size,
        }
        if info.is_main:
            from vlp.tracking import stage_run

            run_ctx = stage_run(
                cfg, "pretrain", params=params, resumes=record.get("mlflow_run_id"), inputs=inputs
            )
        else:
            run_ctx = nullcontext(None)
        with run_ctx as run:
            if run:
                # the run a later --resume marks as interrupted and links to its own
                update_run_record(work_dir(cfg), mlflow_run_id=run.run_id)
            warmup, result = _train_phases(
                model, cfg, run, warmup_phase, joint, joint_weights, resume
            )
            if info.is_main:
                zero_shot = save_and_check(model, built, transform)  # the tower's pixels
                metrics = summary(result, zero_shot, time.perf_counter() - t0, warmup)
                run.set_tags({"vlp.device": result.device, "vlp.precision": result.precision})
                write_results(cfg, run, metrics, _loss_curve(result, warmup))
        barrier()
    return out_dir
