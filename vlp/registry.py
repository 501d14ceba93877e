"""Register finetuned task models in MLflow and gate `champion` on the primary metric.

Aliases, not stages: every new version gets `challenger`; `promote` moves `champion` to
it only if its primary metric is higher on the same evaluation data, or with `force`.
Scores count only for the model and data they were measured on: `vlp evaluate` records
both in the metrics file (`model_sha256` of the model directory it scored; `evaluated_on`:
split, data folder and the content hash of the dataset it read), registration needs the
model hash to be the registered directory's and copies that record onto the version, and
`promote` compares only versions evaluated on the same split of the same data, never a
model with itself. Decisions are tags on the versions; the champion history is a tag on
the registered model, so `rollback` can restore the previous champion.

The module is long because it is one concept: a task model's version lifecycle, whose
registration records exactly what promotion and rollback later compare.
"""

from __future__ import annotations

import getpass
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlp.config import Config
from vlp.errors import RegistryError, ResultsError
from vlp.tasks import TASKS, finetuned_name, get_task, model_sha256

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "vlp.champion_history"
DECISIONS_TAG = "vlp.decisions"
METRIC_TAG = "vlp.primary_metric_value"
METRIC_NAME_TAG = "vlp.primary_metric"  # the metric METRIC_TAG holds (`Task.gate_metric`)
EVALUATED_ON_KEY = "evaluated_on"  # its key in metrics/<task>.json (written by `vlp evaluate`)
# the evaluation record on a version: split, data folder, content hash of the data read
EVAL_SPLIT_TAG = "vlp.eval_split"
EVAL_DATA_TAG = "vlp.eval_data"
EVAL_HASH_TAG = "vlp.eval_data_hash"
EVALUATED_ON_TAGS = {"split": EVAL_SPLIT_TAG, "data": EVAL_DATA_TAG, "data_hash": EVAL_HASH_TAG}
MODEL_HASH_TAG = "vlp.model_sha256"  # content hash of the registered model directory
EVALUATED_HASH_TAG = "vlp.evaluated_model_sha256"  # hash of the model the metrics scored
MODEL_HASH_KEY = "model_sha256"  # its key in metrics/<task>.json (written by `vlp evaluate`)
# what a decision means for the champion; `outcome` reports the most severe one
OUTCOMES = {
    "promoted": "promoted",
    "rejected": "kept",
    "unchanged": "kept",
    "skipped": "kept",
    "refused": "refused",
}
SEVERITY = ("promoted", "kept", "refused")
KEEP = 30  # entries kept in the JSON history/decision tags (tag values are size-limited)


def model_name(cfg: Config, task: str) -> str:
    """Registered model name of `task`: `vlp-captioning`, or `vlp-captioning-smoke` in a run
    of profile `smoke`.

    A profile's models (a direct `vlp --profile NAME` command, or a stage of its flow run)
    are registered and promoted apart from the default pipeline's: they never compete
    with its champions.
    """
    from vlp.lineage import profile_label

    profile = profile_label(cfg)
    suffix = "" if profile == "default" else f"-{profile}"
    return f"{cfg.registry.name_prefix}{task}{suffix}"


def _tasks(task: str) -> list[str]:
    if task == "all":
        return list(TASKS)
    return [get_task(task, RegistryError).name]


def _client(cfg: Config) -> Any:
    """A client of the tracking store; TrackingError naming it within seconds if it is down."""
    import mlflow

    from vlp.tracking import connect_for_command

    connect_for_command(cfg)
    return mlflow.MlflowClient()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---------------------------------------------------------------- metrics and data


def primary_metric_value(metrics: dict[str, Any], metric: str, source: str) -> float:
    """The primary metric from an evaluation metrics mapping.

    Accepts it at the top level, or under `pretrained` (the shipped variant when the
    metrics file also holds the from-scratch ablation).
    """
    for node in (metrics, metrics.get("pretrained")):
        if isinstance(node, dict) and isinstance(node.get(metric), int | float):
            value = float(node[metric])
            if math.isfinite(value):
                return value
    raise ResultsError(f"{source}: no finite numeric {metric!r} (top level or under 'pretrained')")


def evaluated_model_hash(metrics: dict[str, Any]) -> str | None:
    """The `model_sha256` of the model a metrics mapping scored (top level or under
    `pretrained`, like the primary metric), None if it records none."""
    for node in (metrics, metrics.get("pretrained")):
        if isinstance(node, dict) and isinstance(node.get(MODEL_HASH_KEY), str):
            return node[MODEL_HASH_KEY]
    return None


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "none"


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics JSON file as a mapping; ResultsError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ResultsError(f"{path}: metrics file not found; run `vlp evaluate` first") from e
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object of metrics")
    return data


def _numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numeric(v, f"{key}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def evaluated_on(metrics: dict[str, Any], source: str, task: str) -> dict[str, str]:
    """The evaluation record of a metrics mapping: split, data folder and data content hash.

    RegistryError naming `source` when it has none (metrics not written by `vlp evaluate`).
    """
    record = metrics.get(EVALUATED_ON_KEY)
    if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in EVALUATED_ON_TAGS):
        return {k: record[k] for k in EVALUATED_ON_TAGS}
    raise RegistryError(
        f"{source}: records no '{EVALUATED_ON_KEY}' (split, data, data_hash of the evaluated "
        f"data), so its scores cannot be compared with another version's; "
        f"run `vlp evaluate {task}`, then register"
    )


def _scored_model(model_dir: Path, metrics: dict[str, Any], source: str, task: str) -> str:
    """The content hash of `model_dir`; RegistryError unless `metrics` scored exactly it."""
    model_hash, evaluated = model_sha256(model_dir), evaluated_model_hash(metrics)
    if evaluated is None:
        raise RegistryError(
            f"{source}: records no '{MODEL_HASH_KEY}' of the evaluated model, so its scores "
            f"cannot be tied to {model_dir} (model {_short(model_hash)}); "
            f"run `vlp evaluate {task}`, then register"
        )
    if evaluated != model_hash:
        raise RegistryError(
            f"{source}: scores are of model {_short(evaluated)}, but {model_dir} is "
            f"{_short(model_hash)} (changed since it was evaluated); "
            f"run `vlp evaluate {task}`, then register"
        )
    return model_hash


# ---------------------------------------------------------------- register


def register_model(
    cfg: Config,
    task: str,
    model_dir: Path,
    metrics: dict[str, Any],
    *,
    source: str | None = None,
    loader: str | None = None,
    extra_code_paths: list[Path] | None = None,
) -> dict[str, Any]:
    """Log `model_dir` as a pyfunc in a `register` stage run, register it, tag it `challenger`.

    `metrics` must record the content hash of `model_dir` as `model_sha256` and the data it
    was scored on as `evaluated_on` (what `vlp evaluate` writes): scores of another model,
    or of unrecorded data, are refused with a RegistryError naming `source` (the metrics
    file). The first version of a model (no champion yet) also becomes `champion`.
    """
    import mlflow

    from vlp.lineage import profile_label
    from vlp.serving import DEFAULT_LOADER, log_task_model
    from vlp.tracking import log_to_pipeline_run, stage_run

    client = _client(cfg)
    if not Path(model_dir).is_dir():
        raise RegistryError(f"{model_dir}: model directory not found; run `vlp finetune {task}`")
    source = source or f"metrics for {task}"
    metric = get_task(task, RegistryError).gate_metric(metrics)
    value = primary_metric_value(metrics, metric, source)
    model_hash = _scored_model(Path(model_dir), metrics, source, task)
    record = {EVALUATED_ON_TAGS[k]: v for k, v in evaluated_on(metrics, source, task).items()}
    name = model_name(cfg, task)
    inputs = {"model": (model_dir, model_hash)}
    with stage_run(cfg, "register", task=task, tags=record, inputs=inputs) as run:
        run.log_metrics(_numeric(metrics))
        info = log_task_model(
            task,
            Path(model_dir),
            registered_model_name=name,
            loader=loader or DEFAULT_LOADER,
            limits=cfg.serving,
            extra_code_paths=extra_code_paths,
        )
        tags = mlflow.get_run(run.run_id).data.tags
    if parent_id := tags.get("mlflow.parentRunId"):
        log_to_pipeline_run(cfg, parent_id, {f"{task}.{metric}": value})
    version = str(info.registered_model_version)
    for key, val in {
        "vlp.task": task,
        METRIC_NAME_TAG: metric,
        METRIC_TAG: repr(value),
        **record,
        MODEL_HASH_TAG: model_hash,
        EVALUATED_HASH_TAG: model_hash,  # `_scored_model` checked they are the same
        "vlp.run_id": run.run_id,
        "vlp.git_commit": tags.get("vlp.git_commit", "none"),
        "vlp.params_hash": tags.get("vlp.params_hash", "none"),
        "vlp.profile": profile_label(cfg),
        "vlp.registered_by": _who(),
        "vlp.registered_at": _now(),
    }.items():
        client.set_model_version_tag(name, version, key, val)
    client.set_registered_model_alias(name, CHALLENGER, version)
    out = {"task": task, "model": name, "version": version, metric: value, "run_id": run.run_id}
    if _alias(client, name, CHAMPION) is None:
        out["promotion"] = promote(cfg, task, reason="first version of the model")
    return out


def register_task_models(cfg: Config, task: str = "all") -> list[dict[str, Any]]:
    """Register the finetuned model of `task` (or of every task) from the pipeline outputs.

    A task whose metrics file says `"applicable": false` (`vlp evaluate` of a task the model
    does not do) is skipped, with the reason in its entry.
    """
    from vlp.tracking import check_stage_outputs

    check_stage_outputs(cfg, {})
    _client(cfg)  # a store that is down is named before anything is read
    results = []
    for t in _tasks(task):
        metrics_path = Path(cfg.runtime.metrics_dir) / f"{t}.json"
        metrics = read_metrics(metrics_path)
        if metrics.get("applicable") is False:  # e.g. captioning for a dual encoder
            why = str(metrics.get("reason", "not applicable to this model"))
            results.append({"task": t, "registered": False, "why": f"not applicable: {why}"})
            continue
        primary_metric_value(metrics, TASKS[t].gate_metric(metrics), str(metrics_path))
        results.append(
            register_model(
                cfg,
                t,
                Path(cfg.evaluate.models_dir) / finetuned_name(t),  # the model these metrics score
                metrics,
                source=str(metrics_path),
            )
        )
    return results


# ---------------------------------------------------------------- promote / rollback


def _alias(client: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points at; None if the model or alias does not exist.

    Any other failure (a store that stopped answering) is a TrackingError, never "none".
    """
    from mlflow.exceptions import MlflowException

    from vlp.tracking import NOT_FOUND_CODES, store_error

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in NOT_FOUND_CODES:
            return None
        raise store_error(client.tracking_uri, e) from None


def _json_tag(tags: dict[str, str], key: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(tags.get(key, "[]"))
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def _record(client: Any, name: str, version: str, entry: dict[str, Any]) -> None:
    """Append a decision to the version's log and mirror the latest one as flat tags."""
    mv = client.get_model_version(name, version)
    log = [*_json_tag(mv.tags, DECISIONS_TAG), entry][-KEEP:]
    client.set_model_version_tag(name, version, DECISIONS_TAG, json.dumps(log))
    for key in ("decision", "by", "at", "why", "metrics"):
        val = entry[key]
        client.set_model_version_tag(
            name, version, f"vlp.last_{key}", val if isinstance(val, str) else json.dumps(val)
        )


def _set_champion(client: Any, name: str, version: str, entry: dict[str, Any]) -> None:
    model = client.get_registered_model(name)
    history = [*_json_tag(model.tags, HISTORY_TAG), {"version": version, **entry}][-KEEP:]
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _unproven(version: Any) -> str | None:
    """Why a version's scores may not be of its model (hash tags missing or different)."""
    model_hash = version.tags.get(MODEL_HASH_TAG)
    evaluated = version.tags.get(EVALUATED_HASH_TAG)
    if model_hash and evaluated == model_hash:
        return None
    return (
        f"version {version.version}: its scores are not proven to be of its model "
        f"(evaluated {_short(evaluated)}, model {_short(model_hash)})"
    )


def _evaluated_on(version: Any) -> str:
    """Where a version was evaluated, for messages: `<split> of <data> (data <hash>)`."""
    tags = version.tags
    if not all(tags.get(t) for t in EVALUATED_ON_TAGS.values()):
        return f"version {version.version}: no recorded evaluation data"
    return (
        f"version {version.version}: {tags[EVAL_SPLIT_TAG]} of {tags[EVAL_DATA_TAG]} "
        f"(data {tags[EVAL_HASH_TAG][:12]})"
    )


def _comparable(challenger: Any, champion: Any) -> bool:
    """Whether both versions record an evaluation on the same split of the same data, scored
    by the same metric."""
    keys = (EVAL_SPLIT_TAG, EVAL_HASH_TAG, METRIC_NAME_TAG)
    new, old = ([v.tags.get(k) for k in keys] for v in (challenger, champion))
    return all(new) and new == old


def _decide(challenger: Any, champion: Any | None, metric: str, force: bool) -> tuple[str, str]:
    """(decision, why) of the gate; see `promote`."""
    unproven = _unproven(challenger)
    if champion is not None and champion.version == challenger.version:
        return "unchanged", "challenger already is the champion"
    if unproven and not force:
        return "refused", f"{unproven}; evaluate and register it again, or use --force to override"
    forced = f"forced although {unproven}" if unproven else "forced"
    if champion is None:
        return "promoted", "no champion yet" + (f"; {forced}" if unproven else "")
    model_hash = challenger.tags.get(MODEL_HASH_TAG)
    if model_hash and model_hash == champion.tags.get(MODEL_HASH_TAG):
        return "unchanged", (
            f"version {challenger.version} is the same model as champion version "
            f"{champion.version} (model {_short(model_hash)}): nothing to gain"
        )
    if force:
        return "promoted", forced
    if not _comparable(challenger, champion):
        return "refused", (
            f"evaluated on different data ({_evaluated_on(challenger)}; champion "
            f"{_evaluated_on(champion)}): scores are not comparable; evaluate both on the "
            "same split and data, or use --force to override"
        )
    new, old = (float(v.tags.get(METRIC_TAG, "nan")) for v in (challenger, champion))
    if new > old:
        return "promoted", f"{metric} {new:.4g} > {old:.4g}"
    return "rejected", f"{metric} {new:.4g} <= champion {old:.4g}"


def promote(cfg: Config, task: str, force: bool = False, reason: str = "") -> dict[str, Any]:
    """Move `champion` to `challenger` if its primary metric is higher on the same eval data.

    Returns the decision: promoted | rejected | refused | unchanged. Refused: the
    challenger's tags do not show its metrics were measured on its own model (content
    hashes), or it was evaluated on another split or other data than the champion.
    Unchanged: it is the champion, or the same model (content hash) as the champion.
    `force` overrides a refusal; every decision but "already the champion" is recorded on
    the version(s) involved.
    """
    spec = get_task(task, RegistryError)
    name = model_name(cfg, task)
    client = _client(cfg)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"{name}: no '{CHALLENGER}' version; run `vlp register {task}` first")
    metric = challenger.tags.get(METRIC_NAME_TAG, spec.primary_metric)
    champion = _alias(client, name, CHAMPION)
    new = float(challenger.tags.get(METRIC_TAG, "nan"))
    old = float(champion.tags.get(METRIC_TAG, "nan")) if champion else None
    metrics = {"metric": metric, "challenger": new, "champion": old}
    decision, why = _decide(challenger, champion, metric, force)
    if reason:
        why = f"{why}; {reason}"
    entry = {"decision": decision, "by": _who(), "at": _now(), "why": why, "metrics": metrics}
    if champion is None or champion.version != challenger.version:
        _record(client, name, challenger.version, entry)
        if champion is not None and decision != "unchanged":
            role = "replaced" if decision == "promoted" else "defended"
            _record(client, name, champion.version, {**entry, "decision": role})
    if decision == "promoted":
        _set_champion(
            client, name, str(challenger.version), {k: entry[k] for k in ("by", "at", "why")}
        )
        client.delete_registered_model_alias(name, CHALLENGER)
    return {
        "task": task,
        "model": name,
        "decision": decision,
        "why": why,
        "challenger": str(challenger.version),
        # a missing champion always leads to "promoted"
        "champion": str(challenger.version if decision == "promoted" else champion.version),
        "metrics": metrics,
    }


def promote_all(
    cfg: Config, force: bool = False, reason: str = "", pipeline: bool = False
) -> list[dict[str, Any]]:
    """Run the promotion gate for every task that has a challenger.

    `pipeline` (the pipeline's last stage) skips it when `registry.auto_promote` is off.
    """
    out = []
    client = _client(cfg)
    for task in TASKS:
        if pipeline and not cfg.registry.auto_promote:
            out.append({"task": task, "decision": "skipped", "why": "registry.auto_promote is off"})
        elif _alias(client, model_name(cfg, task), CHALLENGER) is None:
            out.append({"task": task, "decision": "unchanged", "why": "no challenger"})
        else:
            why = reason or ("pipeline auto-promote" if pipeline else "")
            out.append(promote(cfg, task, force=force, reason=why))
    return out


def outcome(decisions: list[dict[str, Any]]) -> str:
    """The most severe outcome of promotion decisions: refused > kept > promoted.

    Kept: rejected (not better), unchanged or skipped; `champion` stayed where it was.
    """
    return max((OUTCOMES[d["decision"]] for d in decisions), key=SEVERITY.index, default="kept")


def rollback(cfg: Config, task: str, reason: str = "") -> dict[str, Any]:
    """Restore the previous champion from the model's champion history."""
    name = model_name(cfg, _tasks(task)[0])
    client = _client(cfg)
    from mlflow.exceptions import MlflowException

    from vlp.tracking import NOT_FOUND_CODES, store_error

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code not in NOT_FOUND_CODES:
            raise store_error(client.tracking_uri, e) from None
        raise RegistryError(f"{name}: no such registered model") from e
    history = _json_tag(model.tags, HISTORY_TAG)
    if len(history) < 2:
        raise RegistryError(f"{name}: no previous champion to roll back to")
    current, previous = history[-1], history[-2]
    why = f"rollback from version {current['version']} to {previous['version']}"
    entry = {
        "decision": "rolled back",
        "by": _who(),
        "at": _now(),
        "why": f"{why}; {reason}" if reason else why,
        "metrics": {},
    }
    client.set_registered_model_alias(name, CHAMPION, previous["version"])
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    _record(client, name, current["version"], entry)
    _record(client, name, previous["version"], {**entry, "decision": "restored"})
    return {"task": task, "model": name, "champion": previous["version"], "was": current["version"]}
