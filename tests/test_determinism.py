"""Two identical smoke pipelines, each stage its own `vlp` process, give byte-identical model
directories, predictions (generated images and galleries too) and plots, and the same scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_helpers import empty_store  # noqa: F401

pytestmark = pytest.mark.slow  # two pipelines of `vlp` subprocesses

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
STAGES = (
    ["pretrain"],
    ["finetune", "vqa"],
    ["evaluate", "vqa"],
    ["finetune", "generation"],
    ["evaluate", "generation"],
)


def _pipeline(root: Path, data: Path, store: Path) -> None:
    """Run STAGES in `root` (its own MLflow store), one `vlp --profile smoke` process each."""
    root.mkdir()
    shutil.copy(store, root / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cli = [sys.executable, "-m", "vlp.cli", "--params", str(REPO_ROOT / "params.yaml")]
    cli += ["--profile", "smoke", "--set", "runtime.device=cpu", "--set", f"data.root={data}"]
    cli += ["--set", "finetune.ablation=false"]
    for stage in STAGES:
        done = subprocess.run(
            cli + stage, cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def _scores(path: Path) -> dict[str, object]:
    """A metrics JSON file without the timings it records (`*_s`, samples per second)."""

    def untimed(d: dict[str, object]) -> dict[str, object]:
        return {
            k: untimed(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if not k.endswith(("_s", "_per_s"))
        }

    return untimed(json.loads(path.read_text()))


def test_identical_pipelines_give_identical_models_and_predictions(
    smoke_data: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(len(runs)) as pool:
        for done in [pool.submit(_pipeline, r, smoke_data, empty_store) for r in runs]:
            done.result()

    outputs = [root / "profiles" / "smoke" for root in runs]  # a profile's output folder
    folders = ("models/pretrained", "models/finetuned/vqa-pretrained", "results/vqa", "plots")
    folders += ("models/finetuned/generation-pretrained", "results/generation")
    for folder in folders:
        a, b = (_files(out / folder) for out in outputs)
        assert a, f"{folder} is empty"
        assert sorted(a) == sorted(b), folder
        differ = [name for name in a if a[name] != b[name]]
        assert not differ, f"{folder}: {differ} differ"
    assert "tokenizer/tokenizer.json" in _files(outputs[0] / "models/pretrained")
    assert "generator/unet/diffusion_pytorch_model.safetensors" in _files(
        outputs[0] / "models/finetuned/generation-pretrained"
    )
    for name in ("pretrain.json", "vqa.json", "generation.json"):
        a, b = (_scores(out / "metrics" / name) for out in outputs)
        assert a == b, name
    assert "model_sha256" in a["pretrained"]  # vqa.json ties its scores to the weights
