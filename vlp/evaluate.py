"""The `evaluate` stage: score each finetuned task model on `evaluate.split` (default test).

`evaluate(cfg, task)` evaluates the pretrained-init model in
`evaluate.models_dir/<task>-pretrained` and, when `finetune.ablation` is on, the scratch-init
one (`<task>-scratch`), then writes (what is scored and how is the task's own `evaluate`, in
`vlp.tasks.<task>`):

- `<runtime.metrics_dir>/<task>.json`: `{<primary>: value, "pretrained": {...}, "scratch": {...},
  "delta": {...}}` where `<primary>` is the task's primary metric (retrieval `rsum`,
  captioning `CIDEr`, vqa `overall`, generation `exact_match`, or its fallback where the
  data gives none: `Task.gate_metric`) of the pretrained-init model and `delta` is
  pretrained minus scratch for every metric; each init's block also names the model it
  scored by its content hash, `model_sha256` (`vlp.tasks.model_sha256`), and
  `evaluated_on` names the data: `{"split", "data" (the folder), "data_hash"}`, the
  content hash of the dataset read (`vlp.data.manifest.dataset_hash`). `vlp register`
  copies both onto the registered version, and `vlp promote` compares only like with like;
- `results/<task>/<init>.json`: COCO caption results, VQA results, or retrieval rankings;
- `results/<task>/examples_<init>.html|json`: a few (image, ground truth, prediction) rows,
  and the task's extra files (`TaskEval.files`: generation's gallery, `gallery_<init>.png`);
- plots (in `runtime.plots_dir`): `plots/retrieval_recall_<init>.csv` (R@K by K), `plots/vqa_accuracy_<init>.csv`
  (accuracy per answer type), `plots/captioning_scores_<init>.csv`,
  `plots/generation_scores_<init>.csv`;
- an MLflow stage run `evaluate-<task>` with every number, the plots, results and examples,
  tagged with the same hashes (`vlp.input.model`, `vlp.input.model_scratch`, `vlp.input.data`).

A task the pretrained model does not do (captioning and VQA for a dual encoder, whose
finetune stage wrote a "not applicable" directory) is not scored: the metrics file says
`{"applicable": false, "reason": ...}`, the results folder holds the same record, the plots
are empty, and the MLflow run is tagged `vlp.applicable: false`. A scratch init the task
rules out (generation from a user's pipeline) is left out, as with the ablation off.

Each model is scored through `vlp.tasks.predictor.load_predictor`, the predictor that serving uses,
with the inference settings of its own `task.json`: what is evaluated is what ships.
Metric values come from `vlp.metrics` unchanged (official-equivalent implementations).

Evaluation is single-process: under `torchrun`, rank 0 evaluates and writes everything and
the other ranks return at once, writing nothing. Scoring is cheap next to training, and a
rank 0 that never waits on the others cannot hang or time out in a collective.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from vlp.config import Config
from vlp.errors import ConfigError
from vlp.finetune import INITS, is_skipped, not_applicable
from vlp.io import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    claim_dir,
)
from vlp.tasks import finetuned_name, get_task, model_sha256
from vlp.tasks.spec import Example, TaskEval

EXAMPLE_IMAGE_SIDE = 128  # px; shapes images are tiny, upscale them for the eye


def eval_data(cfg: Config) -> Path:
    """The dataset evaluated: `evaluate.data_root`, else the finetuning data `data.root`."""
    return Path(cfg.evaluate.data_root or cfg.data.root)


def _device(cfg: Config) -> torch.device:
    """Evaluation is single-process: the device `runtime.device` names (auto: CUDA if any)."""
    from vlp.train.distributed import DistInfo
    from vlp.train.settings import resolve_device

    return resolve_device(cfg.runtime.device, DistInfo())


def evaluate_model(cfg: Config, model_dir: Path) -> TaskEval:
    """Scores of one finetuned task model, through the predictor that serving uses.

    Every inference setting (image size, `rerank_k`, `beam_size`, `max_length`) is the
    model's own, from its `task.json`; `evaluate.batch_size` only sets the batches.
    """
    from vlp.tasks.predictor import load_predictor

    predictor = load_predictor(model_dir, device=_device(cfg), batch_size=cfg.evaluate.batch_size)
    return get_task(predictor.task).module().evaluate(cfg, predictor, eval_data(cfg))


def plot_path(cfg: Config, task: str, init: str) -> Path:
    """The evaluation plot CSV of one task and init."""
    return Path(cfg.runtime.plots_dir) / f"{task}_{get_task(task).plot}_{init}.csv"


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


def evaluated_on(cfg: Config) -> dict[str, str]:
    """What evaluation reads: `evaluate.split` of `eval_data`, and that dataset's content hash."""
    from vlp.data.manifest import dataset_hash

    data = eval_data(cfg)
    return {"split": cfg.evaluate.split, "data": str(data), "data_hash": dataset_hash(data)}


def metrics_document(
    cfg: Config,
    task: str,
    per_init: dict[str, dict[str, float]],
    model_hashes: dict[str, str],
    data: dict[str, str],
) -> dict[str, Any]:
    """`metrics/<task>.json`: primary metric on top, both inits and their difference.

    Each init's block carries `model_sha256`, the hash of the model directory it scored;
    `evaluated_on` is `data`, the record of what was evaluated (`evaluated_on`).
    """
    pre = per_init["pretrained"]
    primary = get_task(task).gate_metric(pre)
    doc: dict[str, Any] = {
        primary: pre[primary],
        **{init: {**m, "model_sha256": model_hashes[init]} for init, m in per_init.items()},
    }
    if "scratch" in per_init:
        scratch = per_init["scratch"]
        doc["delta"] = {
            k: pre[k] - scratch[k] for k in pre if k in scratch and not k.endswith("_s")
        }
    doc["evaluated_on"] = data
    return doc


def _record_not_applicable(cfg: Config, task: str, reason: str) -> dict[str, Any]:
    """The declared outputs of a task the model does not do, saying so, and a tagged run."""
    from vlp.tracking import stage_run

    spec = get_task(task)
    doc = {"task": task, "applicable": False, "reason": reason}
    results_dir = claim_dir(Path(cfg.evaluate.results_dir) / task, "results")
    atomic_write_json(results_dir / "not_applicable.json", doc)
    for init in INITS:
        atomic_write_csv(plot_path(cfg, task, init), spec.plot_columns, [])
    metrics_path = Path(cfg.runtime.metrics_dir) / f"{task}.json"
    atomic_write_json(metrics_path, doc)
    tags = {"vlp.applicable": "false", "vlp.not_applicable_reason": reason}
    model = Path(cfg.evaluate.models_dir) / finetuned_name(task)
    inputs = {"model": (model, model_sha256(model))}  # the record that says so
    with stage_run(cfg, "evaluate", task=task, tags=tags, inputs=inputs) as run:
        run.log_artifact(metrics_path)
    print(f"evaluate {task}: not applicable: {reason}")
    return doc


def result_file(results_dir: Path, name: str, init: str) -> Path:
    """Where one init's extra result file `name` (`TaskEval.files`) goes: `<stem>_<init><suffix>`."""
    return results_dir / f"{Path(name).stem}_{init}{Path(name).suffix}"


def _write_results(cfg: Config, task: str, init: str, results_dir: Path, ev: TaskEval) -> None:
    """One init's results, plot rows, examples (HTML and JSON) and extra files."""
    atomic_write_json(results_dir / f"{init}.json", ev.results)
    atomic_write_csv(plot_path(cfg, task, init), get_task(task).plot_columns, ev.plot_rows)
    atomic_write_text(results_dir / f"examples_{init}.html", examples_html(task, init, ev.examples))
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
    for name, content in ev.files.items():
        atomic_write_bytes(result_file(results_dir, name, init), content)


def evaluate(cfg: Config, task: str) -> dict[str, Any] | None:
    """Run the evaluate stage for `task`; return the metrics document it wrote.

    Under `torchrun` only rank 0 evaluates; the other ranks return None at once.
    """
    from vlp.tracking import check_stage_outputs, stage_run
    from vlp.train.distributed import process_rank

    if process_rank() != 0:
        return None
    spec = get_task(task)
    check_stage_outputs(
        cfg,
        {
            "evaluate.results_dir": Path(cfg.evaluate.results_dir) / task,
            "runtime.metrics_dir": Path(cfg.runtime.metrics_dir),
            "runtime.plots_dir": Path(cfg.runtime.plots_dir),
        },
    )
    inits = [i for i in INITS if i == "pretrained" or cfg.finetune.ablation]
    paths = {init: Path(cfg.evaluate.models_dir) / finetuned_name(task, init) for init in inits}
    reason = not_applicable(paths["pretrained"])
    if reason is not None:
        return _record_not_applicable(cfg, task, reason)
    # an init the task rules out (finetune wrote its reason) is not scored, as with the
    # ablation off
    inits = [i for i in inits if not_applicable(paths[i]) is None]
    paths = {init: paths[init] for init in inits}
    for init, path in paths.items():
        if not path.is_dir() or is_skipped(path):
            raise ConfigError(
                f"{path}: no finetuned {task} model ({init} init); "
                f"run `vlp finetune {task}{' --init scratch' if init == 'scratch' else ''}`"
            )
    results_dir = claim_dir(Path(cfg.evaluate.results_dir) / task, "results")
    params = {"split": cfg.evaluate.split, "inits": ",".join(inits), "data": str(eval_data(cfg))}
    params.update({name: getattr(cfg.evaluate, name) for name in spec.evaluate_options})
    # hashed before loading: the scores belong to exactly these bytes
    hashes = {init: model_sha256(path) for init, path in paths.items()}
    data = evaluated_on(cfg)
    inputs = {
        "data": (data["data"], data["data_hash"]),
        **{("model" if i == "pretrained" else f"model_{i}"): (paths[i], hashes[i]) for i in inits},
    }
    with stage_run(cfg, "evaluate", task=task, params=params, inputs=inputs) as run:
        per_init: dict[str, dict[str, float]] = {}
        files: dict[str, list[Path]] = {}
        for init in inits:
            t0 = time.perf_counter()
            ev = evaluate_model(cfg, paths[init])
            per_init[init] = {**ev.metrics, "eval_s": time.perf_counter() - t0}
            _write_results(cfg, task, init, results_dir, ev)
            files[init] = [result_file(results_dir, name, init) for name in ev.files]
        if "scratch" not in inits:  # the DVC stage declares the scratch plot anyway
            atomic_write_csv(plot_path(cfg, task, "scratch"), spec.plot_columns, [])
        doc = metrics_document(cfg, task, per_init, hashes, data)
        metrics_path = Path(cfg.runtime.metrics_dir) / f"{task}.json"
        atomic_write_json(metrics_path, doc)

        flat = {k: v for k, v in doc.items() if isinstance(v, int | float)}
        for group in (*inits, "delta"):
            for k, v in doc.get(group, {}).items():
                if isinstance(v, int | float):
                    flat[f"{group}.{k}"] = v
        run.log_metrics(flat)
        run.set_tags({"vlp.model_sha256": hashes["pretrained"]})
        run.log_artifact(metrics_path)
        for init in inits:
            run.log_artifact(plot_path(cfg, task, init), "plots")
            run.log_artifact(results_dir / f"{init}.json", "results")
            run.log_artifact(results_dir / f"examples_{init}.html", "examples")
            run.log_artifact(results_dir / f"examples_{init}.json", "examples")
            for path in files[init]:
                run.log_artifact(path, "examples")
    print(json.dumps(doc, indent=2))
    return doc
