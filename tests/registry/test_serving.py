"""Request limits of the served pyfunc: rows and pixels bounded, bad requests a clean 400."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from tests.mlflow_helpers import (
    STANDIN,
    STANDIN_LOADER,
    evaluated_metrics,
    free_port,
    http_process,
    make_standin_model,
    png_bytes,
)
from vlp.config import Config, ServingConfig, load_config
from vlp.registry import register_model
from vlp.serving import VLPTaskModel

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
GARBAGE = b"\x89PNG\r\n\x1a\n but not really a PNG"


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 12000 x 12000 1-bit PNG: under 25 KB on the wire, 144 M pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _model(tmp_path: Path, task: str = "captioning", **limits: int) -> VLPTaskModel:
    model_dir = make_standin_model(tmp_path / "standin", "w")
    model = VLPTaskModel()
    loader = "tests.registry.standin_predictor:load_predictor"
    # as registered: params.yaml's serving limits travel in the model config
    serving = dataclasses.asdict(load_config(Path(__file__).parents[2] / "params.yaml").serving)
    config = {"task": task, "loader": loader, **serving, **limits}
    model.load_context(PythonModelContext({"model_dir": str(model_dir)}, config))
    return model


def _refusal(model: VLPTaskModel, frame: pd.DataFrame) -> str:
    with pytest.raises(MlflowException) as info:
        model.predict(None, frame)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert info.value.get_http_status_code() == 400
    assert "\n" not in info.value.message
    return info.value.message


def test_pixel_limit_is_checked_from_the_header_before_decoding(
    tmp_path: Path, bomb_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tmp_path)
    load = PngImageFile.load

    def load_small(self: PngImageFile) -> Any:
        assert self.size[0] < 1000, "the big image's pixels were decoded"
        return load(self)

    monkeypatch.setattr(PngImageFile, "load", load_small)
    message = _refusal(model, pd.DataFrame({"image": [png_bytes(8), bomb_png]}))
    assert message == (
        "row 1: image is 12000x12000 = 144000000 pixels, over the limit of 16777216 "
        "(serving.max_image_pixels)"
    )
    assert len(bomb_png) < 25_000


def test_rows_pixels_garbage_and_missing_columns_are_refused(tmp_path: Path) -> None:
    model = _model(tmp_path, task="vqa", max_rows=2, max_image_pixels=100)
    ok = png_bytes(10)
    assert model.predict(None, pd.DataFrame({"image": [ok], "question": ["q?"]}))[
        "answer"
    ].tolist() == ["w 2"]
    three = pd.DataFrame({"image": [ok] * 3, "question": ["q"] * 3})
    assert _refusal(model, three) == ("request has 3 rows, over the limit of 2 (serving.max_rows)")
    big = pd.DataFrame({"image": [ok, png_bytes(11)], "question": ["q", "q"]})
    assert _refusal(model, big).startswith("row 1: image is 11x11 = 121 pixels, over the limit")
    garbage = pd.DataFrame({"image": [ok, GARBAGE], "question": ["q", "q"]})
    assert _refusal(model, garbage) == "row 1: image is not a decodable image"
    truncated = pd.DataFrame({"image": [ok[:45]], "question": ["q"]})
    assert _refusal(model, truncated) == "row 0: image is not a decodable image"
    assert _refusal(model, pd.DataFrame({"image": [ok]})) == (
        "request lacks column 'question' (vqa expects: image, question)"
    )


def test_images_reach_a_predictor_already_fitted_by_its_transform(tmp_path: Path) -> None:
    from vlp.data.images import ImageTransform

    model = _model(tmp_path)
    seen: list[tuple[str, tuple[int, int]]] = []

    class Sized:
        transform = ImageTransform(16, "shorter_side_crop", (0.5,) * 3, (0.5,) * 3)

        def caption(self, images: list[Any]) -> list[str]:
            seen.extend((im.mode, im.size) for im in images)
            return ["c"] * len(images)

    model.predictor = Sized()
    model.predict(None, pd.DataFrame({"image": [png_bytes(40), png_bytes(8)]}))
    assert seen == [("RGB", (16, 16)), ("RGB", (16, 16))]


def _register_standin_captioner(cfg: Config) -> None:
    """Register the stand-in captioning model (with its evaluated hash) under `cfg`."""
    model_dir = make_standin_model(Path("models/captioning"), "w")
    register_model(
        cfg,
        "captioning",
        model_dir,
        evaluated_metrics(model_dir, {"CIDEr": 1.0}),
        loader=STANDIN_LOADER,
        extra_code_paths=[STANDIN],
    )


@pytest.mark.slow
def test_registered_model_records_the_serving_limits(store_cfg: Config) -> None:
    cfg = dataclasses.replace(store_cfg, serving=ServingConfig(max_image_pixels=99, max_rows=5))
    _register_standin_captioner(cfg)
    model = mlflow.pyfunc.load_model("models:/vlp-captioning@champion")
    assert model.model_config["max_image_pixels"] == 99
    assert model.model_config["max_rows"] == 5


def _post(port: int, columns: list[str], rows: list[list[Any]]) -> tuple[int, str]:
    body = {"dataframe_split": {"columns": columns, "data": rows}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_served_model_answers_bad_requests_with_a_400_and_no_trace(
    store_cfg: Config, bomb_png: bytes, tmp_path: Path
) -> None:
    # limits other than the defaults: the server must take them from the registered model
    cfg = dataclasses.replace(
        store_cfg, serving=ServingConfig(max_image_pixels=4096 * 4096, max_rows=3)
    )
    _register_standin_captioner(cfg)
    port = free_port()
    cmd = [
        MLFLOW, "models", "serve", "-m", "models:/vlp-captioning@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_TRACKING_URI": cfg.tracking.uri,
        "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    good = [[_b64(png_bytes(12))]]
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", env=env, timeout=240):
        refusals = {
            "bomb": _post(port, ["image"], [[_b64(bomb_png)]]),
            "rows": _post(port, ["image"], good * 4),
            "garbage": _post(port, ["image"], [[_b64(png_bytes(12))], [_b64(GARBAGE)]]),
            # refused by MLflow's schema check, before the model sees the request
            "column": _post(port, ["picture"], good),
        }
        # the worker survived the bomb and serves the next request
        assert _post(port, ["image"], good) == (200, '{"predictions": [{"caption": "w 12x12"}]}')
    reasons = {
        "bomb": "Error: row 0: image is 12000x12000 = 144000000 pixels, over the limit of "
        "16777216 (serving.max_image_pixels)",
        "rows": "Error: request has 4 rows, over the limit of 3 (serving.max_rows)",
        "garbage": "Error: row 1: image is not a decodable image",
        "column": "Error: Model is missing inputs ['image']",
    }
    for kind, (status, text) in refusals.items():
        body = json.loads(text)
        assert status == 400, (kind, text)
        assert "stack_trace" not in body, (kind, text)
        # MLflow prefixes the reason with an echo of the request frame: the reason is the last line
        assert reasons[kind] in body["message"].splitlines()[-1], (kind, text)
        for leak in ("Traceback", "site-packages", str(tmp_path), str(Path.cwd()), "vlp/"):
            assert leak not in text, (kind, leak, text)
