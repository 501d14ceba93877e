"""Request limits of the served pyfunc: rows, pixels and texts bounded, bad requests a clean 400."""

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

from tests.checkpoints.vlp import tiny_vlp_dir
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
from vlp.serving import DEFAULT_LOADER, VLPTaskModel
from vlp.tasks import TASKS

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
GARBAGE = b"\x89PNG\r\n\x1a\n but not really a PNG"


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 12000 x 12000 1-bit PNG: under 25 KB on the wire, 144 M pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _model(
    tmp_path: Path,
    task: str = "captioning",
    model_dir: Path | None = None,
    loader: str = "tests.registry.standin_predictor:load_predictor",
    **limits: int,
) -> VLPTaskModel:
    model_dir = model_dir or make_standin_model(tmp_path / "standin", "w")
    model = VLPTaskModel()
    # as registered: params.yaml's serving limits travel in the model config
    serving = dataclasses.asdict(load_config(Path(__file__).parents[2] / "params.yaml").serving)
    config = {"task": task, "loader": loader, **serving, **limits}
    model.load_context(PythonModelContext({"model_dir": str(model_dir)}, config))
    return model


def _refusal(model: VLPTaskModel, frame: pd.DataFrame, params: dict | None = None) -> str:
    with pytest.raises(MlflowException) as info:
        model.predict(None, frame, params)
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


def test_texts_over_the_character_limit_are_refused_before_tokenisation(tmp_path: Path) -> None:
    tokenised: list[str] = []
    ok = png_bytes(8)
    for task, column in (("vqa", "question"), ("retrieval", "text")):
        model = _model(tmp_path, task=task, max_text_chars=10)
        model.predictor.count_tokens = lambda texts: tokenised.extend(texts) or [1] * len(texts)
        huge = pd.DataFrame({"image": [ok, ok], column: ["ten chars!", "x" * 2_000_000]})
        assert _refusal(model, huge) == (
            f"row 1: {column} is 2000000 characters, over the limit of 10 (serving.max_text_chars)"
        )
    embedding = pd.DataFrame({"text": ["a", "eleven char"]})
    assert _refusal(model, embedding, {"output": "embedding"}) == (
        "row 1: text is 11 characters, over the limit of 10 (serving.max_text_chars)"
    )
    assert tokenised == []


def test_token_limit_counts_the_models_own_tokens_before_truncation(
    smoke_cfg: Config, tmp_path: Path
) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "retrieval", rerank_k=0)
    model = _model(tmp_path, "retrieval", model_dir, DEFAULT_LOADER, max_text_tokens=40)
    tokenizer = model.predictor.model.tokenizer
    short, long = "a red circle", " ".join(["a red circle"] * 20)
    n_long = len(tokenizer(long)["input_ids"])
    # over the limit, and far over the text positions the model truncates to
    assert n_long > 40 > smoke_cfg.model.max_text_length
    ok = png_bytes(8)
    assert len(model.predict(None, pd.DataFrame({"image": [ok], "text": [short]}))) == 1
    frame = pd.DataFrame({"image": [ok, ok], "text": [short, long]})
    assert _refusal(model, frame) == (
        f"row 1: text is {n_long} tokens, over the limit of 40 (serving.max_text_tokens)"
    )
    assert _refusal(model, frame[["text"]], {"output": "embedding"}).startswith("row 1: text is")


def test_texts_that_are_not_strings_are_refused_naming_row_and_field(tmp_path: Path) -> None:
    ok = png_bytes(8)
    vqa = _model(tmp_path, "vqa")
    assert _refusal(vqa, pd.DataFrame({"image": [ok, ok], "question": ["q?", None]})) == (
        "row 1: question must be a string, got null"
    )
    assert _refusal(vqa, pd.DataFrame({"image": [ok], "question": [5]})) == (
        "row 0: question must be a string, got int64"
    )
    retrieval = _model(tmp_path, "retrieval")
    assert _refusal(retrieval, pd.DataFrame({"image": [ok], "text": [float("nan")]})) == (
        "row 0: text must be a string, got null"
    )


def test_a_failing_predictor_is_a_server_error_without_its_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tmp_path)

    def broken(images: list[Any]) -> list[str]:
        raise RuntimeError("/srv/secret/weights.bin: corrupt")

    model.predictor.caption = broken
    with pytest.raises(MlflowException) as info:
        model.predict(None, pd.DataFrame({"image": [png_bytes(8)]}))
    assert info.value.get_http_status_code() == 500
    assert info.value.message == (
        "the captioning model failed on this request (RuntimeError); the server log has the details"
    )
    assert "stack_trace" not in info.value.serialize_as_json()
    # the operator still finds the cause in the server log
    assert "/srv/secret/weights.bin: corrupt" in caplog.text


def _register_standin(cfg: Config, task: str = "captioning") -> None:
    """Register the stand-in `task` model (with its evaluated hash) under `cfg`."""
    model_dir = make_standin_model(Path(f"models/{task}"), "w")
    register_model(
        cfg,
        task,
        model_dir,
        evaluated_metrics(model_dir, {TASKS[task].primary_metric: 1.0}),
        loader=STANDIN_LOADER,
        extra_code_paths=[STANDIN],
    )


@pytest.mark.slow
def test_registered_model_records_the_serving_limits(store_cfg: Config) -> None:
    limits = ServingConfig(
        max_image_pixels=99,
        max_rows=5,
        max_text_chars=7,
        max_text_tokens=3,
        max_generation_prompts=2,
        max_generation_steps=9,
        max_guidance_scale=2.5,
    )
    _register_standin(dataclasses.replace(store_cfg, serving=limits))
    model = mlflow.pyfunc.load_model("models:/vlp-captioning@champion")
    assert {k: model.model_config[k] for k in dataclasses.asdict(limits)} == {
        "max_image_pixels": 99,
        "max_rows": 5,
        "max_text_chars": 7,
        "max_text_tokens": 3,
        "max_generation_prompts": 2,
        "max_generation_steps": 9,
        "max_guidance_scale": 2.5,
    }


def _post(
    port: int, columns: list[str], rows: list[list[Any]], params: dict | None = None
) -> tuple[int, str]:
    body: dict[str, Any] = {"dataframe_split": {"columns": columns, "data": rows}}
    if params:
        body["params"] = params
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
    cfg = dataclasses.replace(store_cfg, serving=dataclasses.replace(store_cfg.serving, max_rows=3))
    _register_standin(cfg)
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


def _assert_clean_400s(refusals: dict[str, tuple[int, str]], reasons: dict[str, str]) -> None:
    for kind, (status, text) in refusals.items():
        body = json.loads(text)
        assert status == 400, (kind, text)
        assert "stack_trace" not in body, (kind, text)
        assert body["message"].splitlines()[-1] == reasons[kind], (kind, text)
        for leak in ("Traceback", "site-packages", str(Path.cwd()), "vlp/"):
            assert leak not in text, (kind, leak, text)


@pytest.mark.slow
def test_served_model_refuses_null_and_overlong_texts_with_a_clean_400(store_cfg: Config) -> None:
    limits = dataclasses.replace(store_cfg.serving, max_text_chars=50)
    cfg = dataclasses.replace(store_cfg, serving=limits)
    _register_standin(cfg, "retrieval")
    port = free_port()
    cmd = [
        MLFLOW, "models", "serve", "-m", "models:/vlp-retrieval@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_TRACKING_URI": cfg.tracking.uri,
        "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    image, columns = _b64(png_bytes(12)), ["image", "text"]
    with http_process(cmd, f"http://127.0.0.1:{port}/ping", env=env, timeout=240):
        refusals = {
            "null": _post(port, columns, [[image, "a circle"], [image, None]]),
            "huge": _post(port, columns, [[image, "x" * 2_000_000]]),
            "embedding": _post(port, ["text"], [["y" * 51]], {"output": "embedding"}),
        }
        assert _post(port, columns, [[image, "a circle"]]) == (
            200,
            '{"predictions": [{"score": 20.0}]}',
        )
    _assert_clean_400s(
        refusals,
        {
            "null": "Error: row 1: text must be a string, got null",
            "huge": "Error: row 0: text is 2000000 characters, over the limit of 50 "
            "(serving.max_text_chars)",
            "embedding": "Error: row 0: text is 51 characters, over the limit of 50 "
            "(serving.max_text_chars)",
        },
    )


@pytest.mark.slow
def test_registered_vqa_model_refuses_a_null_question_naming_the_row(store_cfg: Config) -> None:
    _register_standin(store_cfg, "vqa")
    model = mlflow.pyfunc.load_model("models:/vlp-vqa@champion")
    frame = pd.DataFrame({"image": [png_bytes(8)] * 2, "question": ["q?", None]})
    with pytest.raises(MlflowException) as info:
        model.predict(frame)
    assert info.value.get_http_status_code() == 400
    assert info.value.message == "row 1: question must be a string, got null"
    assert "stack_trace" not in info.value.serialize_as_json()
