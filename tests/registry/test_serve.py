"""`mlflow models serve` answers a REST request with a caption from the champion."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from pathlib import Path

from mlflow_helpers import (
    STANDIN,
    STANDIN_LOADER,
    free_port,
    http_process,
    make_standin_model,
    png_bytes,
)

from vlp.config import Config
from vlp.registry import register_model

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def test_served_champion_captions_an_image(store_cfg: Config, tmp_path: Path) -> None:
    register_model(
        store_cfg,
        "captioning",
        make_standin_model(tmp_path / "m", "served"),
        {"CIDEr": 1.0},
        eval_hash="h",
        loader=STANDIN_LOADER,
        extra_code_paths=[STANDIN],
    )
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
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", env=env, timeout=180):
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png_bytes(14)).decode()]],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert answer == {"predictions": [{"caption": "served 14x14"}]}
