"""Real finetuned task models as pyfuncs: loaded for every task, served over REST for one."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from tests.mlflow_helpers import evaluated_metrics, free_port, http_process
from vlp.config import Config
from vlp.registry import register_model
from vlp.tasks import TASKS

pytestmark = pytest.mark.slow  # trains every task model and serves one

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def finetuned(
    smoke_cfg: Config,
    smoke_data: Path,
    smoke_pretrained: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """One smoke-size finetuned model directory per task, trained once for this module."""
    from vlp.finetune import finetune

    root = tmp_path_factory.mktemp("finetuned")
    cfg = dataclasses.replace(
        smoke_cfg,
        runtime=dataclasses.replace(smoke_cfg.runtime, plots_dir=str(root / "plots")),
        finetune=dataclasses.replace(
            smoke_cfg.finetune, init_dir=str(smoke_pretrained), out_dir=str(root / "models")
        ),
        tracking=dataclasses.replace(smoke_cfg.tracking, artifact_root=str(root / "art")),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        return {task: finetune(cfg, task) for task in TASKS}


def finetuned_size(model_dir: Path) -> int:
    """The side of the images a generation model directory generates."""
    return int(json.loads((model_dir / "task.json").read_text())["generated_size"])


def _image_bytes(cfg: Config) -> bytes:
    from vlp.data.manifest import read_pairs

    path = Path(cfg.data.root) / read_pairs(cfg.data.root, "test")["image_path"].iloc[0]
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def test_every_real_task_model_loads_and_predicts(
    store_cfg: Config, finetuned: dict[str, Path]
) -> None:
    image = _image_bytes(store_cfg)
    frames = {
        "captioning": pd.DataFrame({"image": [image]}),
        "vqa": pd.DataFrame({"image": [image, image], "question": ["is there a circle?"] * 2}),
        "retrieval": pd.DataFrame({"image": [image, image], "text": ["a red circle", "x"]}),
        "generation": pd.DataFrame({"prompt": ["a large red circle at the top left"]}),
    }
    for task in TASKS:
        metric = TASKS[task].primary_metric
        metrics = evaluated_metrics(finetuned[task], {metric: 1.0})
        register_model(store_cfg, task, finetuned[task], metrics)
        model = mlflow.pyfunc.load_model(f"models:/vlp-{task}@champion")
        out = model.predict(frames[task])
        column = TASKS[task].output[0]
        assert list(out.columns) == [column] and len(out) == len(frames[task])
        if task == "retrieval":
            assert out["score"].map(float).notna().all()
        elif task == "generation":  # a PNG of the generated side, base64
            png = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
            assert png.format == "PNG" and png.size[0] == finetuned_size(finetuned[task])
        else:
            assert all(isinstance(v, str) for v in out[column])
    # the model directory travels with the model: weights, tokenizer, config
    local = mlflow.artifacts.download_artifacts("models:/vlp-captioning@champion")
    assert (Path(local) / "artifacts" / finetuned["captioning"].name / "task.json").exists()


def test_served_champion_captions_an_image(
    store_cfg: Config, finetuned: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = shutil.copytree(finetuned["captioning"], tmp_path / "captioning")
    metrics = evaluated_metrics(model_dir, {"CIDEr": 1.0})
    register_model(store_cfg, "captioning", model_dir, metrics)
    image = _image_bytes(store_cfg)
    expected = mlflow.pyfunc.load_model("models:/vlp-captioning@champion").predict(
        pd.DataFrame({"image": [image]})
    )["caption"][0]

    port = free_port()
    cmd = [
        MLFLOW, "models", "serve", "-m", "models:/vlp-captioning@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # `--env-manager local` execs `uvicorn` from PATH: the venv's bin must be on it
    env = {
        "MLFLOW_TRACKING_URI": store_cfg.tracking.uri,
        "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", env=env, timeout=240):
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    assert answer == {"predictions": [{"caption": expected}]}
    assert expected.strip()
