"""The `vlp` command: parse arguments, load the config, call one stage.

Stage modules are imported inside each command so that `vlp --help` stays fast and a
command only pays for the libraries it uses; `vlp eval` reads no params at all, so it runs
outside a project (tests/test_light_commands.py keeps it and `vlp validate` free of torch,
MLflow and transformers). The module is one file past 450 lines on
purpose: every command's options and the handler that runs it sit side by side, and
`tests/test_dvc_deps.py` derives each stage's code deps from this file's handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from vlp.config import VQA_PROTOCOLS, Config, load_config, shapes_dir
from vlp.errors import VlpError
from vlp.tasks import TASK_NAMES as TASKS

# `vlp promote` exit status by outcome (2 stays "user error"); see docs/reference.md "Registry and promotion"
PROMOTE_EXIT = {"promoted": 0, "kept": 3, "refused": 4}


def _print_json(obj: object, out: str | None) -> None:
    """Print `obj` as JSON and, with `out`, write it there first: a reader that stops early
    (`| head`) does not cost the file, and a file that cannot be written still shows."""
    text = json.dumps(obj, indent=2, sort_keys=False)
    error = None
    if out:
        from vlp.errors import OutputError
        from vlp.io import atomic_write_text

        try:
            atomic_write_text(Path(out), text + "\n")
        except OSError as e:
            error = OutputError(f"--out {out}: cannot write it ({e.strerror or e})")
    print(text)
    if error is not None:
        raise error


def _check_out(out: str | None) -> None:
    """OutputError when `--out` cannot be written: checked before long work or registry changes."""
    if out:
        from vlp.io import check_writable

        check_writable({f"--out {out}": Path(out).parent})


def _cmd_generate(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.data.shapes import generate_dataset

    generate_dataset(cfg.data, Path(args.out) if args.out else shapes_dir(cfg.profile))


def _cmd_import(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.data import adapters

    adapters.run_import(args)


def _cmd_validate(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.data.validation import validate_stage

    validate_stage(cfg, Path(args.data) if args.data else None)


def _cmd_shard(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.data.shards import write_shards

    index = write_shards(Path(args.data), Path(args.out), args.samples_per_shard, args.split)
    total = index["total"]
    sizes = ", ".join(f"{k}: {v['images']} images" for k, v in total["splits"].items())
    print(f"vlp shard: {args.out}: {total['shards']} shards, {total['samples']} samples ({sizes})")


def _cmd_pretrain(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.pretrain import pretrain

    pretrain(cfg, resume=args.resume)


def _cmd_pretrain_vision(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.pretrain_vision import pretrain_vision

    pretrain_vision(cfg, resume=args.resume)


def _cmd_probe(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.probe import probe

    probe(cfg)


def _cmd_finetune(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.finetune import finetune

    finetune(cfg, args.task, init=args.init)


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.evaluate import evaluate

    evaluate(cfg, args.task)


def _cmd_eval(cfg: None, args: argparse.Namespace) -> None:
    from vlp.metrics import files

    if args.kind == "generation":
        scores = _score_generation(args)
    elif args.kind == "captions":
        scores = files.score_caption_files(Path(args.results), Path(args.annotations))
    elif args.kind == "vqa":
        scores = files.score_vqa_files(
            Path(args.results), Path(args.questions), Path(args.annotations), args.protocol
        )
    else:
        scores = files.score_retrieval_files(
            Path(args.similarity), Path(args.text_image) if args.text_image else None
        )
    _print_json(scores, args.out)


def _score_generation(args: argparse.Namespace) -> dict:
    """`vlp eval generation`: params (and torch) only when a model scores the images."""
    from vlp.metrics.generation import score_generation_files

    _check_out(args.out)  # before the models run

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    device, batch_size = "cpu", None
    if args.model or args.clip or (args.reference and args.inception_weights):
        from vlp.train.distributed import DistInfo
        from vlp.train.settings import resolve_device

        cfg = _load_config(args)
        device = resolve_device(cfg.runtime.device, DistInfo())
        batch_size = cfg.zeroshot.batch_size
    return score_generation_files(
        Path(args.annotations),
        Path(args.images),
        model_dir=path(args.model),
        clip_dir=path(args.clip),
        reference_dir=path(args.reference),
        inception_weights=path(args.inception_weights),
        device=device,
        batch_size=batch_size,
    )


def _cmd_zeroshot(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.zeroshot import zeroshot

    _check_out(args.out)  # before the models run
    if args.clip_benchmark:
        from vlp.io import check_writable

        check_writable(
            {f"--clip-benchmark {args.clip_benchmark}": Path(args.clip_benchmark).parent}
        )
    from vlp.errors import ConfigError
    from vlp.models.family import ZEROSHOT_TASKS
    from vlp.tasks import TASKS as TASK_SPECS

    if args.vqa:
        args.task = "vqa"
    if args.task not in ZEROSHOT_TASKS:
        raise ConfigError(f"--task: {args.task!r} is not one of {', '.join(ZEROSHOT_TASKS)}")
    task = None if args.classify else TASK_SPECS.get(args.task)
    if task is not None and task.zeroshot is not None:  # its package measures it
        _print_json(_zeroshot_by_task(cfg, args, task), args.out)
        return
    if args.answers:
        raise ConfigError("--answers ranks VQA answers: it needs --task vqa (--vqa)")
    scores = zeroshot(
        cfg,
        Path(args.model),
        Path(args.data),
        split=args.split,
        precision=args.precision,
        batch_size=args.batch_size,
        rerank_k=args.rerank_k,
        rerank_score=args.rerank_score,
        classify=args.classify or args.task == "classification",
        labels=args.labels,
        classes_file=args.classes,
        templates_file=args.templates,
    )
    _print_json(scores, args.out)
    if args.clip_benchmark:
        from vlp.io import atomic_write_json
        from vlp.metrics.clip_benchmark import CLASSIFICATION, RETRIEVAL, clip_benchmark_record

        task = CLASSIFICATION if args.classify else RETRIEVAL
        model, data = Path(args.model), Path(args.data)
        record = clip_benchmark_record(scores, task, data.name, model.name, str(model))
        atomic_write_json(Path(args.clip_benchmark), record)


def _cmd_embed(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.embeddings import embed

    out = embed(
        cfg,
        Path(args.model),
        Path(args.data),
        Path(args.out),
        split=args.split,
        precision=args.precision,
        batch_size=args.batch_size,
    )
    print(f"vlp embed: wrote {out}")


def _cmd_register(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.registry import register_task_models

    _check_out(args.out)
    _print_json(register_task_models(cfg, args.task), args.out)


def _cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from vlp.registry import outcome, promote, promote_all

    _check_out(args.out)
    if args.task == "all":
        out = promote_all(cfg, force=args.force, reason=args.reason, pipeline=args.pipeline)
        decisions = out
    else:
        out = promote(cfg, args.task, force=args.force, reason=args.reason)
        decisions = [out]
    _print_json(out, args.out)
    for d in decisions:
        if d["decision"] == "refused":
            print(
                f"vlp promote: error: {d['model']} version {d['challenger']} refused: {d['why']}",
                file=sys.stderr,
            )
    result = outcome(decisions)
    # the pipeline's gate succeeds when it keeps the champion; a refusal needs a person
    return 0 if args.pipeline and result == "kept" else PROMOTE_EXIT[result]


def _cmd_rollback(cfg: Config, args: argparse.Namespace) -> None:
    from vlp.registry import rollback

    _print_json(rollback(cfg, args.task, reason=args.reason), None)


def _cmd_flow(cfg: Config, args: argparse.Namespace) -> None:
    import os

    # Without PREFECT_API_URL a run starts a temporary server; Prefect's 20 s startup
    # limit is too tight on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows import pipeline

    if args.action == "run":
        # with --profile or --set: a variant, saved as a DVC experiment; the workspace stays
        pipeline.vlp_pipeline(
            params=str(args.params_path),
            profile=args.profile,
            overrides=args.overrides,
            experiment=args.experiment,
        )
    else:
        pipeline.serve(cfg)


def _cmd_repro(cfg: Config, args: argparse.Namespace) -> int:
    from vlp.repro import repro_profile

    return repro_profile(
        args.params_path,
        args.profile,
        args.overrides,
        name=args.name,
        targets=args.targets,
        dry_run=args.dry_run,
    )


def _checkpoint_args(s: argparse.ArgumentParser) -> None:
    """--model, --data, --precision and --batch-size of `vlp zeroshot` and `vlp embed`."""
    s.add_argument("--model", required=True, help="vlp, CLIP or BLIP model directory")
    s.add_argument("--data", required=True, help="dataset directory")
    s.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="bf16 autocast or fp32 (default zeroshot.precision; auto: fp32 on CPU)",
    )
    s.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per forward pass (default zeroshot.batch_size)",
    )


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """generate, import, validate, shard: the datasets."""
    s = sub.add_parser("generate", help="generate the embedded shapes dataset")
    s.add_argument(
        "--out",
        default=None,
        help="output directory (default data/shapes; with --profile NAME profiles/NAME/data/shapes)",
    )
    s.set_defaults(func=_cmd_generate)

    _add_import_command(sub)

    s = sub.add_parser("validate", help="check manifests and images (Great Expectations)")
    s.add_argument(
        "--data", default=None, help="dataset or `vlp shard` directory (default data.root)"
    )
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser(
        "shard",
        help="write a dataset's images and captions as webdataset shards for streamed training",
    )
    s.add_argument("--data", required=True, help="dataset directory (pairs.parquet + images)")
    s.add_argument("--out", required=True, help="shard directory to write (replaced as a whole)")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar shard")
    s.add_argument(
        "--split", action="append", default=None, help="only this split (repeatable; default all)"
    )
    s.set_defaults(func=_cmd_shard)


def _add_import_command(sub: argparse._SubParsersAction) -> None:
    """import: one subcommand per source format."""
    s = sub.add_parser("import", help="import a real-format dataset into canonical manifests")
    fmt = s.add_subparsers(dest="format", required=True)
    f = fmt.add_parser("coco", help="COCO captions annotations JSON + image folder")
    f.add_argument("--annotations", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    f = fmt.add_parser("karpathy", help="Karpathy split JSON (dataset_coco/flickr30k.json)")
    f.add_argument("--split-json", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--out", required=True)
    f = fmt.add_parser("vqa", help="VQA v2 questions + annotations JSON")
    f.add_argument("--questions", required=True)
    f.add_argument("--annotations", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    f = fmt.add_parser("table", help="CSV or Parquet of (image_path, caption[, split])")
    f.add_argument("--table", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_import)


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """pretrain-vision, pretrain and finetune: the training stages."""
    s = sub.add_parser(
        "pretrain-vision", help="pretrain the ViT image tower as a masked autoencoder (MAE)"
    )
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=_cmd_pretrain_vision)

    s = sub.add_parser("pretrain", help="pretrain with ITC + ITM + captioning LM")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser(
        "probe", help="linear probes of the random, MAE and pretrained image encoders (shapes)"
    )
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("finetune", help="finetune one downstream task")
    s.add_argument("task", choices=TASKS)
    s.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained")
    s.set_defaults(func=_cmd_finetune)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """evaluate (a task model) and eval (standard results files)."""
    s = sub.add_parser("evaluate", help="evaluate a finetuned task model on the test split")
    s.add_argument("task", choices=TASKS)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser(
        "eval", help="score standard results files (captions, VQA, retrieval, generated images)"
    )
    # scoring files reads no params: `vlp eval` runs anywhere (generation's models read
    # runtime.device and zeroshot.batch_size when given)
    s.set_defaults(reads_params=False)
    kind = s.add_subparsers(dest="kind", required=True)
    k = kind.add_parser("captions", help="COCO caption results vs COCO annotations")
    k.add_argument("--results", required=True)
    k.add_argument("--annotations", required=True)
    k.add_argument("--out", default=None)
    k = kind.add_parser("vqa", help="VQA v2 results vs questions + annotations")
    k.add_argument("--results", required=True)
    k.add_argument("--questions", required=True)
    k.add_argument("--annotations", required=True)
    k.add_argument(
        "--protocol",
        choices=VQA_PROTOCOLS,
        default="official",
        help="answer normalisation: the official VQA v2 script today (default) or the copy "
        "LAVIS/BLIP/ALBEF ship",
    )
    k.add_argument("--out", default=None)
    k = kind.add_parser("retrieval", help="recall@K from an image x text similarity matrix")
    k.add_argument("--similarity", required=True)
    k.add_argument("--text-image", default=None)
    k.add_argument("--out", default=None)
    _add_eval_generation(kind)
    s.set_defaults(func=_cmd_eval)


def _add_eval_generation(kind: argparse._SubParsersAction) -> None:
    """`vlp eval generation`: generated images vs the prompts they were drawn from."""
    k = kind.add_parser(
        "generation",
        help="generated images vs their prompts: compositional accuracy, CLIP/ITC score, FID",
        description="ANNOTATIONS is a COCO captions file: each annotation's caption is the "
        "prompt its image was generated from, `images` gives each image's file_name under "
        "IMAGES. Shapes-world prompts get exact compositional accuracy (a deterministic parser "
        "reads each image back; other prompts are counted in unparsable_prompts); the other "
        "scores need their inputs. Models run on runtime.device in batches of "
        "zeroshot.batch_size. See docs/generation-metrics.md.",
    )
    k.add_argument("--annotations", required=True)
    k.add_argument("--images", required=True, help="folder the file_names are relative to")
    k.add_argument(
        "--model",
        default=None,
        help="a vlp model directory (or CLIP/BLIP checkpoint): itc_score, and FID's features",
    )
    k.add_argument("--clip", default=None, help="a transformers CLIP directory: clip_score")
    k.add_argument("--reference", default=None, help="folder of real images: fid")
    k.add_argument(
        "--inception-weights",
        default=None,
        help="torch-fidelity's Inception v3 weights file (pt_inception-2015-12-05): the "
        "standard FID features instead of --model's; needs the torch-fidelity package",
    )
    k.add_argument("--out", default=None)


def _zeroshot_by_task(cfg: Config, args: argparse.Namespace, task: Any) -> dict[str, float]:
    """`vlp zeroshot --task T` where T's package measures it (captioning, VQA)."""
    from vlp.errors import ConfigError

    embedding_only = ("rerank_k", "rerank_score", "classify", "labels", "classes", "templates")
    embedding_only += ("clip_benchmark",)
    given = [
        f"--{a.replace('_', '-')}" for a in embedding_only if getattr(args, a) not in (None, False)
    ]
    if given:
        raise ConfigError(f"--task {task.name}: {', '.join(given)} do not apply")
    return task.zeroshot_module().zeroshot(
        cfg,
        Path(args.model),
        Path(args.data),
        split=args.split,
        precision=args.precision,
        batch_size=args.batch_size,
        answers=args.answers,
    )


def _add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    """zeroshot and embed: any checkpoint, untrained."""
    s = sub.add_parser(
        "zeroshot",
        help="measure any checkpoint without training it: retrieval R@K, --classify, or "
        "captioning and VQA of models that write text (--task)",
        description="MODEL is a vlp model directory, a transformers CLIPModel directory, a "
        "BLIP retrieval or VQA directory or a VisionEncoderDecoderModel directory. Retrieval on "
        "DATA's captions (ITM re-ranking when the model has an ITM head), or with --classify "
        "zero-shot classification (top-1/top-5): DATA is an image-folder tree "
        "DATA/<class>/<image>, or a vlp dataset with --labels. --task captioning: generated "
        "captions (BLEU, ROUGE-L, CIDEr-D); --task vqa (or --vqa): VQA accuracy of the answers "
        "a VQA task model or a model that writes answers gives to DATA's questions.",
    )
    _checkpoint_args(s)
    s.add_argument("--split", default=None, help="split measured (default zeroshot.split)")
    s.add_argument(
        "--rerank-k",
        type=int,
        default=None,
        help="ITC candidates per query re-ranked by the ITM head; 0: ITC only (default: a "
        "task model's own, else zeroshot.rerank_k)",
    )
    s.add_argument(
        "--rerank-score",
        default=None,
        help="vlp: ITM log-odds + ITC logit; blip: ITM match logit + cosine, as BLIP's own "
        "evaluation (default: a task model's own, else zeroshot.rerank_score)",
    )
    s.add_argument("--classify", action="store_true", help="zero-shot image classification")
    s.add_argument(
        "--task",
        default="retrieval",
        help="retrieval (default), classification (as --classify), captioning or vqa (as "
        "--vqa); each model family is measured on some (the generative ones: captioning, vqa)",
    )
    s.add_argument(
        "--vqa",
        action="store_true",
        help="answer DATA's VQA questions of the split (a VQA task model, or a checkpoint that "
        "writes answers: BLIP's BlipForQuestionAnswering); VQA accuracy (evaluate.vqa_protocol)",
    )
    s.add_argument(
        "--answers",
        default=None,
        help="with --vqa: a JSON list of candidate answers (BLIP's answer_list.json) ranked by "
        "the answer decoder instead of writing (top zeroshot.answer_rank_k by first token)",
    )
    s.add_argument(
        "--labels",
        default=None,
        help="CSV/Parquet of image_id,label over DATA's images, or `shapes` (single-object "
        "scenes of the shapes world, labelled by shape)",
    )
    s.add_argument(
        "--classes", default=None, help="text file of class names, one a line (default: labels)"
    )
    s.add_argument(
        "--templates",
        default=None,
        help="text file of prompt templates, one a line, {} for the class, or a named set: "
        "openai_imagenet (CLIP's 80 ImageNet prompts) (default zeroshot.templates)",
    )
    s.add_argument("--out", default=None, help="also write the scores JSON here")
    s.add_argument(
        "--clip-benchmark",
        default=None,
        metavar="PATH",
        help="also write the scores in CLIP_benchmark's result JSON layout here",
    )
    s.set_defaults(func=_cmd_zeroshot)

    s = sub.add_parser(
        "embed",
        help="write L2-normalised embeddings of a dataset's images and captions (Parquet)",
    )
    _checkpoint_args(s)
    s.add_argument("--split", default=None, help="only this split (default: every split)")
    s.add_argument("--out", required=True, help="Parquet file to write (its folder must exist)")
    s.set_defaults(func=_cmd_embed)


def _add_registry_commands(sub: argparse._SubParsersAction) -> None:
    """register, promote, rollback: the MLflow model registry."""
    s = sub.add_parser("register", help="register finetuned task models in the MLflow registry")
    s.add_argument("task", choices=(*TASKS, "all"), nargs="?", default="all")
    s.add_argument("--out", default=None, help="also write the result JSON here")
    s.set_defaults(func=_cmd_register)

    s = sub.add_parser(
        "promote",
        help="move `champion` to `challenger` if it is better",
        description="Exit status: 0 promoted, 3 kept (not better, or nothing to promote), "
        "4 refused (scores not of this model, or different eval data); for `all` the most "
        "severe over the tasks. 2: user error.",
    )
    s.add_argument("task", choices=(*TASKS, "all"))
    s.add_argument("--force", action="store_true", help="promote even if not better")
    s.add_argument("--reason", default="", help="recorded on the version")
    s.add_argument(
        "--pipeline",
        action="store_true",
        help="the pipeline's gate: do nothing unless registry.auto_promote is true; "
        "exit 0 when the champion is kept",
    )
    s.add_argument("--out", default=None, help="also write the decisions JSON here")
    s.set_defaults(func=_cmd_promote)

    s = sub.add_parser("rollback", help="restore the previous champion")
    s.add_argument("task", choices=TASKS)
    s.add_argument("--reason", default="", help="recorded on the version")
    s.set_defaults(func=_cmd_rollback)


def _add_flow_command(sub: argparse._SubParsersAction) -> None:
    """flow: the Prefect pipeline."""
    s = sub.add_parser(
        "flow",
        help="run the Prefect pipeline once, or serve its schedule",
        description="With --profile or --set, `run` runs a variant in a temporary worktree "
        "and saves it as a DVC experiment (`dvc exp show`); the workspace is left as it was.",
    )
    s.add_argument("action", choices=("run", "serve"))
    s.add_argument(
        "--experiment",
        default=None,
        metavar="NAME",
        help="name of a variant's DVC experiment (default <profile>-<time>)",
    )
    s.set_defaults(func=_cmd_flow)


def _add_repro_command(sub: argparse._SubParsersAction) -> None:
    """repro: the DVC pipeline at a profile's sizes, as a DVC experiment."""
    s = sub.add_parser(
        "repro",
        help="run the whole pipeline at a profile's sizes as a DVC experiment "
        "(e.g. `vlp --profile smoke repro`)",
        description="Runs `dvc exp run --temp` with the profile and any --set expanded into "
        "-S flags: the stages run in a temporary copy of the repository, the result is a DVC "
        "experiment (`dvc exp show`, `dvc exp apply`), and the workspace's params, dvc.lock, "
        "metrics and models are left as they were. Models are registered as "
        "vlp-<task>-<profile>, apart from the default pipeline's.",
    )
    s.add_argument(
        "targets", nargs="*", help="stages to reproduce, with what they need (default: all)"
    )
    # also accepted after the command; the one before it otherwise
    s.add_argument("--profile", default=argparse.SUPPRESS, help="profile of profiles.yaml")
    s.add_argument(
        "--name", default=None, help="the DVC experiment's name (default <profile>-<time>)"
    )
    s.add_argument(
        "--dry-run", action="store_true", help="print the `dvc exp run` command; run nothing"
    )
    s.set_defaults(func=_cmd_repro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlp",
        description="vlp: pretrain, finetune, evaluate and promote vision-language models.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.add_argument(
        "--profile", default=None, help="profile of profiles.yaml applied over params, e.g. smoke"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param, applied after --profile (repeatable)",
    )
    p.set_defaults(reads_params=True)
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_eval_commands(sub)
    _add_checkpoint_commands(sub)
    _add_registry_commands(sub)
    _add_flow_command(sub)
    _add_repro_command(sub)
    return p


def _reader_gone(stream: TextIO) -> bool:
    """Whether `stream` is a pipe or socket whose reading end has been closed."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)  # no events asked: errors and hang-ups only
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _load_config(args: argparse.Namespace) -> Config:
    """The config of `--params`, `--profile` and `--set`."""
    return load_config(args.params_path, args.profile, args.overrides)


def _run(args: argparse.Namespace) -> int:
    """Load the config (for a command that reads params) and run the command; a user error
    is one line on stderr and exit 2."""
    try:
        cfg = _load_config(args) if args.reads_params else None
        status = args.func(cfg, args)
        sys.stdout.flush()  # a reader that has gone shows here, not in the flush at exit
    except VlpError as e:
        # one line, whatever the message quotes (a YAML parser's excerpt, a driver's SQL)
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"vlp {args.command}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return status or 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.params_path = Path(args.params)
    # MLflow announces the creation of a fresh local store on stderr: not the user's concern,
    # and a user error must stay one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        return _run(args)
    except BrokenPipeError:
        gone = [s for s in (sys.stdout, sys.stderr) if _reader_gone(s)]
        if not gone:
            raise
        # the reader stopped early (`vlp ... | head -1`): end quietly with the status of a
        # Unix tool ended by SIGPIPE; Python would otherwise report the lost output at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in gone:
            os.dup2(devnull, stream.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
