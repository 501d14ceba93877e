"""The `evaluate` stage: score each finetuned task model on `evaluate.split` (default test).

`evaluate(cfg, task)` evaluates the pretrained-init model in `evaluate.models_dir/<task>`
and, when `finetune.ablation` is on, the scratch-init one (`<task>_scratch`), then writes:

- `<runtime.metrics_dir>/<task>.json`: `{<primary>: value, "pretrained": {...}, "scratch": {...},
  "delta": {...}}` where `<primary>` is `registry.primary_metric[task]` (retrieval `rsum`,
  captioning `CIDEr`, vqa `overall`) of the pretrained-init model and `delta` is
  pretrained minus scratch for every metric; each init's block also names the model it
  scored by its content hash, `model_sha256` (`vlp.tasks.model_sha256`);
- `results/<task>/<init>.json`: COCO caption results, VQA results, or retrieval rankings;
- `results/<task>/examples_<init>.html|json`: a few (image, ground truth, prediction) rows;
- plots (in `runtime.plots_dir`): `plots/retrieval_recall_<init>.csv` (R@K by K), `plots/vqa_accuracy_<init>.csv`
  (accuracy per answer type), `plots/captioning_scores_<init>.csv`;
- an MLflow stage run `evaluate-<task>` with every number, the plots, results and examples.

Metric values come from `vlp.metrics` unchanged (official-equivalent implementations).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlp.config import TASKS, Config
from vlp.errors import ConfigError
from vlp.finetune import INITS, is_skipped, model_name
from vlp.io import atomic_write_json, atomic_write_text, claim_dir
from vlp.tasks import model_sha256

EXAMPLE_IMAGE_SIDE = 128  # px; shapes images are tiny, upscale them for the eye


@dataclass
class Example:
    """One qualitative example: an image file, what is asked, the truth and the prediction."""

    image_path: Path
    ground_truth: list[str]
    prediction: str
    query: str = ""


@dataclass
class TaskEval:
    """What evaluating one model produced."""

    metrics: dict[str, float]
    results: Any  # JSON-serialisable results file content
    plot_rows: list[dict[str, Any]]
    examples: list[Example] = field(default_factory=list)


def _loader(dataset: Any, cfg: Config) -> Iterator[dict[str, Any]]:
    from vlp.data.torch_data import collate

    return iter(DataLoader(dataset, batch_size=cfg.evaluate.batch_size, collate_fn=collate))


def eval_data(cfg: Config) -> Path:
    """The dataset evaluated: `evaluate.data_root`, else the finetuning data `data.root`."""
    return Path(cfg.evaluate.data_root or cfg.data.root)


def _device(cfg: Config) -> torch.device:
    """Evaluation is single-process: the device `runtime.device` names (auto: CUDA if any)."""
    from vlp.train.distributed import DistInfo
    from vlp.train.loop import resolve_device

    return resolve_device(cfg.runtime.device, DistInfo())


# ---------------------------------------------------------------- retrieval


@torch.no_grad()
def evaluate_retrieval(cfg: Config, model_path: Path) -> TaskEval:
    """R@1/5/10 both ways (and rsum) after ITM re-ranking of the ITC top-k; ITC-only too."""
    from vlp.data.manifest import read_pairs, resolve_image
    from vlp.data.torch_data import ImagesDataset
    from vlp.metrics.retrieval import KS, recall_at_k
    from vlp.models import VLPModel
    from vlp.tasks.retrieval import encode_images, encode_texts, retrieval_scores

    split, data = cfg.evaluate.split, eval_data(cfg)
    model = VLPModel.from_pretrained(model_path, device=_device(cfg)).eval()
    images = ImagesDataset(data, split, cfg.data.image_size)
    pairs = read_pairs(data, split)
    index = {image_id: i for i, image_id in enumerate(images.image_ids)}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    captions = [str(c) for c in pairs["caption"]]

    image_embeds, image_feat = encode_images(
        model, (b["pixel_values"] for b in _loader(images, cfg))
    )
    ids, mask, text_feat = encode_texts(model, captions, cfg.evaluate.batch_size)
    k = cfg.finetune.retrieval.rerank_k
    s = retrieval_scores(
        model, image_embeds, image_feat, ids, mask, text_feat, k, cfg.evaluate.batch_size
    )
    i2t, t2i, itc = (m.float().cpu() for m in (s.i2t, s.t2i, s.itc))
    ranked_i2t = recall_at_k(i2t, text_to_image)
    ranked_t2i = recall_at_k(t2i, text_to_image)
    metrics = {key: v for key, v in ranked_i2t.items() if key.startswith("i2t_")}
    metrics.update({key: v for key, v in ranked_t2i.items() if key.startswith("t2i_")})
    metrics["rsum"] = sum(metrics[f"{d}_R@{x}"] for d in ("i2t", "t2i") for x in KS)
    metrics["mean_R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    itc_only = recall_at_k(itc, text_to_image)
    metrics.update({f"itc_{key}": v for key, v in itc_only.items() if "R@" in key or key == "rsum"})

    rows = [{"k": x, "i2t": metrics[f"i2t_R@{x}"], "t2i": metrics[f"t2i_R@{x}"]} for x in KS]

    top = 10
    caption_ids = [int(c) for c in pairs["caption_id"]]
    top_texts = i2t.topk(min(top, i2t.shape[1]), dim=1).indices
    top_images = t2i.t().topk(min(top, i2t.shape[0]), dim=1).indices
    results = {
        "i2t": {
            str(images.image_ids[i]): [caption_ids[j] for j in row]
            for i, row in enumerate(top_texts.tolist())
        },
        "t2i": {
            str(caption_ids[j]): [images.image_ids[i] for i in row]
            for j, row in enumerate(top_images.tolist())
        },
    }
    by_image = pairs.groupby("image_id", sort=False)["caption"].apply(list).to_dict()
    examples = [
        Example(
            image_path=resolve_image(data, images.frame["image_path"][i]),
            ground_truth=[str(c) for c in by_image[images.image_ids[i]]],
            prediction=captions[int(top_texts[i, 0])],
            query="top-1 retrieved caption",
        )
        for i in range(min(cfg.evaluate.num_examples, len(images)))
    ]
    return TaskEval(metrics, results, rows, examples)


# ---------------------------------------------------------------- captioning


@torch.no_grad()
def evaluate_captioning(cfg: Config, model_path: Path) -> TaskEval:
    """BLEU-1..4, ROUGE-L and CIDEr-D of beam-search captions against all references."""
    from vlp.data.manifest import read_pairs, resolve_image
    from vlp.data.torch_data import ImagesDataset
    from vlp.metrics.caption import score_captions
    from vlp.models import VLPModel
    from vlp.tasks.captioning import generate, references

    split, data = cfg.evaluate.split, eval_data(cfg)
    tcfg = cfg.finetune.captioning
    model = VLPModel.from_pretrained(model_path, device=_device(cfg)).eval()
    images = ImagesDataset(data, split, cfg.data.image_size)
    refs = references(read_pairs(data, split))
    batches = ((b["pixel_values"], b["image_id"].tolist()) for b in _loader(images, cfg))
    captions = generate(model, batches, tcfg.beam_size, tcfg.max_length)
    metrics = {k: float(v) for k, v in score_captions(captions, refs).items()}
    results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]
    rows = [{"metric": k, "score": v} for k, v in metrics.items()]
    examples = [
        Example(
            image_path=resolve_image(data, images.frame["image_path"][i]),
            ground_truth=refs[image_id],
            prediction=captions[image_id],
        )
        for i, image_id in enumerate(images.image_ids[: cfg.evaluate.num_examples])
    ]
    return TaskEval(metrics, results, rows, examples)


# ---------------------------------------------------------------- vqa


@torch.no_grad()
def evaluate_vqa(cfg: Config, model_path: Path) -> TaskEval:
    """Official VQA accuracy (overall, per answer type, per question type) of the answer head."""
    from vlp.data.manifest import resolve_image
    from vlp.data.torch_data import VQADataset
    from vlp.metrics.vqa import vqa_accuracy
    from vlp.models import VLPModel
    from vlp.tasks import read_task_info
    from vlp.tasks.vqa import load_vqa_model

    split, data = cfg.evaluate.split, eval_data(cfg)
    info = read_task_info(model_path)
    vlp = VLPModel.from_pretrained(model_path, device=_device(cfg))
    model = load_vqa_model(vlp, info, model_path).eval()
    dataset = VQADataset(data, split, cfg.data.image_size)
    predictions: dict[int, str] = {}
    for batch in _loader(dataset, cfg):
        enc = vlp.tokenize(batch["question"])
        answers = model.predict(
            batch["pixel_values"].to(vlp.temp.device), enc["input_ids"], enc["attention_mask"]
        )
        predictions.update(zip(batch["question_id"].tolist(), answers, strict=True))
    frame = dataset.frame
    scores = vqa_accuracy(
        predictions,
        {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)},
        answer_types={
            int(q): str(t) for q, t in zip(frame["question_id"], frame["answer_type"], strict=True)
        },
        question_types={
            int(q): str(t)
            for q, t in zip(frame["question_id"], frame["question_type"], strict=True)
        },
        protocol=cfg.evaluate.vqa_protocol,
    )
    metrics = {"overall": float(scores["overall"])}
    metrics.update({f"type_{k}": float(v) for k, v in scores["perAnswerType"].items()})
    # per question type ("what color is the" -> qtype_what_color_is_the), as the official
    # script's perQuestionType: shows which skills (colour, shape, counting) a model lacks
    metrics.update(
        {f"qtype_{'_'.join(k.split())}": float(v) for k, v in scores["perQuestionType"].items()}
    )
    results = [{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]
    rows = [{"answer_type": "overall", "accuracy": metrics["overall"]}] + [
        {"answer_type": k, "accuracy": float(v)} for k, v in sorted(scores["perAnswerType"].items())
    ]
    examples = [
        Example(
            image_path=resolve_image(data, row["image_path"]),
            ground_truth=list(row["answers"]),
            prediction=predictions[int(row["question_id"])],
            query=str(row["question"]),
        )
        for row in frame.head(cfg.evaluate.num_examples).to_dict("records")
    ]
    return TaskEval(metrics, results, rows, examples)


EVALUATORS = {
    "retrieval": evaluate_retrieval,
    "captioning": evaluate_captioning,
    "vqa": evaluate_vqa,
}


# ---------------------------------------------------------------- files


PLOT_FILES = {  # task -> (plot file stem, CSV columns)
    "retrieval": ("recall", ("k", "i2t", "t2i")),
    "captioning": ("scores", ("metric", "score")),
    "vqa": ("accuracy", ("answer_type", "accuracy")),
}


def plot_path(cfg: Config, task: str, init: str) -> Path:
    """The evaluation plot CSV of one task and init."""
    return Path(cfg.runtime.plots_dir) / f"{task}_{PLOT_FILES[task][0]}_{init}.csv"


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _image_data_uri(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize(
            (EXAMPLE_IMAGE_SIDE, EXAMPLE_IMAGE_SIDE), Image.Resampling.NEAREST
        )
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def examples_html(task: str, init: str, examples: list[Example]) -> str:
    """A self-contained HTML table of examples (images inlined), viewable in the MLflow UI."""
    rows = []
    for ex in examples:
        truth = "<br>".join(html.escape(t) for t in ex.ground_truth)
        query = f"<b>{html.escape(ex.query)}</b><br>" if ex.query else ""
        rows.append(
            f'<tr><td><img src="{_image_data_uri(ex.image_path)}"></td>'
            f"<td>{query}{truth}</td><td>{html.escape(ex.prediction)}</td></tr>"
        )
    return (
        f"<html><head><meta charset='utf-8'><title>{task} {init}</title></head><body>"
        f"<h3>{task}: {init} init</h3><table border='1' cellpadding='4'>"
        "<tr><th>image</th><th>ground truth</th><th>prediction</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts ("@" is not allowed): `i2t_R@1` -> `i2t_R_at_1`."""
    return name.replace("@", "_at_")


def metrics_document(
    cfg: Config,
    task: str,
    per_init: dict[str, dict[str, float]],
    model_hashes: dict[str, str],
) -> dict[str, Any]:
    """`metrics/<task>.json`: primary metric on top, both inits and their difference.

    Each init's block carries `model_sha256`, the hash of the model directory it scored.
    """
    primary = cfg.registry.primary_metric.get(task)
    pre = per_init["pretrained"]
    if primary not in pre:
        raise ConfigError(
            f"registry.primary_metric.{task}: {primary!r} is not one of {', '.join(pre)}"
        )
    doc: dict[str, Any] = {
        primary: pre[primary],
        **{init: {**m, "model_sha256": model_hashes[init]} for init, m in per_init.items()},
    }
    if "scratch" in per_init:
        scratch = per_init["scratch"]
        doc["delta"] = {
            k: pre[k] - scratch[k] for k in pre if k in scratch and not k.endswith("_s")
        }
    return doc


def evaluate(cfg: Config, task: str) -> dict[str, Any]:
    """Run the evaluate stage for `task`; return the metrics document it wrote."""
    from vlp.tracking import check_stage_outputs, stage_run

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    check_stage_outputs(
        cfg,
        {
            "evaluate.results_dir": Path(cfg.evaluate.results_dir) / task,
            "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
            "runtime.plots_dir": Path(cfg.runtime.plots_dir),
        },
    )
    inits = [i for i in INITS if i == "pretrained" or cfg.finetune.ablation]
    paths = {init: Path(cfg.evaluate.models_dir) / model_name(task, init) for init in inits}
    for init, path in paths.items():
        if not path.is_dir() or is_skipped(path):
            raise ConfigError(
                f"{path}: no finetuned {task} model ({init} init); "
                f"run `vlp finetune {task}{' --init scratch' if init == 'scratch' else ''}`"
            )
    results_dir = claim_dir(Path(cfg.evaluate.results_dir) / task, "results")
    params = {"split": cfg.evaluate.split, "inits": ",".join(inits), "data": str(eval_data(cfg))}
    if task == "vqa":
        params["vqa_protocol"] = cfg.evaluate.vqa_protocol
    with stage_run(cfg, "evaluate", task=task, params=params) as run:
        per_init: dict[str, dict[str, float]] = {}
        # hashed before loading: the scores belong to exactly these bytes
        hashes = {init: model_sha256(path) for init, path in paths.items()}
        for init in inits:
            t0 = time.perf_counter()
            ev = EVALUATORS[task](cfg, paths[init])
            per_init[init] = {**ev.metrics, "eval_s": time.perf_counter() - t0}
            atomic_write_json(results_dir / f"{init}.json", ev.results)
            atomic_write_text(plot_path(cfg, task, init), _csv(PLOT_FILES[task][1], ev.plot_rows))
            atomic_write_text(
                results_dir / f"examples_{init}.html", examples_html(task, init, ev.examples)
            )
            atomic_write_json(
                results_dir / f"examples_{init}.json",
                [
                    {
                        "image": str(e.image_path),
                        "query": e.query,
                        "ground_truth": e.ground_truth,
                        "prediction": e.prediction,
                    }
                    for e in ev.examples
                ],
            )
        if "scratch" not in inits:  # the DVC stage declares the scratch plot anyway
            atomic_write_text(plot_path(cfg, task, "scratch"), _csv(PLOT_FILES[task][1], []))
        doc = metrics_document(cfg, task, per_init, hashes)
        metrics_path = Path(cfg.runtime.metrics_dir) / f"{task}.json"
        atomic_write_json(metrics_path, doc)

        flat = {mlflow_key(k): v for k, v in doc.items() if isinstance(v, int | float)}
        for group in (*inits, "delta"):
            for k, v in doc.get(group, {}).items():
                if isinstance(v, int | float):
                    flat[mlflow_key(f"{group}.{k}")] = v
        run.log_metrics(flat)
        run.set_tags({"vlp.model_sha256": hashes["pretrained"]})
        run.log_artifact(metrics_path)
        for init in inits:
            run.log_artifact(plot_path(cfg, task, init), "plots")
            run.log_artifact(results_dir / f"{init}.json", "results")
            run.log_artifact(results_dir / f"examples_{init}.html", "examples")
            run.log_artifact(results_dir / f"examples_{init}.json", "examples")
    print(json.dumps(doc, indent=2))
    return doc
