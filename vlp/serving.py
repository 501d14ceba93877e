"""A finetuned task model as an MLflow pyfunc: servable with `mlflow models serve`.

The pyfunc carries the task model directory (weights, tokenizer, config) as an artifact
and the `vlp` package as code, and answers one row per request item:

| task       | inputs                          | output            |
|------------|---------------------------------|-------------------|
| captioning | image (binary)                  | caption (string)  |
| vqa        | image (binary), question (str)  | answer (string)   |
| retrieval  | image (binary), text (str)      | score (double)    |
| generation | prompt (str)                    | image (PNG, base64 string) |

(each task declares its columns: `inputs` and `output` of `vlp.tasks.<task>.TASK`)

The retrieval model also answers embedding requests: with `params={"output": "embedding"}`
each row holds an `image` or a `text` (the other left out or null) and the answer is its
L2-normalised ITC embedding (`embedding`, a list of floats), the vectors `vlp embed` writes.

Over REST, binary columns travel base64-encoded; MLflow decodes them using the signature.

A task's request params (generation: `sample_steps`, `guidance_scale`) default to the
model's task.json settings and are checked by the task's `serve` against its own limits.

Requests are bounded by the `serving` limits recorded in the model at registration: at
most `max_rows` rows, images of at most `max_image_pixels` pixels, checked from the
image header before any pixel is decoded, and texts of at most `max_text_chars`
characters, checked before any tokenisation, and `max_text_tokens` tokens, counted by the
model's tokenizer before the model runs. Images are decoded one at a time and shrunk to
the model's input size straight away. A request that breaks a limit, lacks a column, holds
a text that is not a string or bytes that are not an image is refused with MLflow's HTTP
400 and a one-line reason naming the row and the field, without a stack trace. Any other
failure is the server's: HTTP 500 with a one-line message, the traceback in the server log.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import typing
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from vlp.config import ServingConfig
from vlp.errors import RegistryError, RequestError
from vlp.tasks import get_task

DEFAULT_LOADER = "vlp.tasks.predictor:load_predictor"
VLP_PACKAGE_DIR = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


# The output param of an embedding task's (`Task.embeddings`) embedding requests: rows of
# an `image` or a `text`.
EMBEDDING = "embedding"


def task_signature(task: str, settings: dict[str, Any] | None = None) -> Any:
    """The MLflow signature of `task`'s pyfunc (see the table in the module docstring).

    An embedding task's columns are optional (an embedding row holds one of them) and its
    `output` param chooses the answer: the task's own (default) or `embedding`. A task's
    request params (`Task.request_params`) default to the model's own `settings` (its
    task.json).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    spec = get_task(task, RegistryError)
    out_name, out_type = spec.output
    params = []
    for name, kind in spec.request_params:
        if settings is None or name not in settings:
            raise RegistryError(f"task.json: lacks the {task} setting {name!r}")
        params.append(ParamSpec(name, kind, settings[name]))
    if spec.embeddings:
        params.append(ParamSpec("output", "string", out_name))
    return ModelSignature(
        inputs=Schema([ColSpec(t, n, required=not spec.embeddings) for n, t in spec.inputs]),
        outputs=Schema([ColSpec(out_type, out_name)]),
        params=ParamSchema(params) if params else None,
    )


def check_request(task: str, model_input: pd.DataFrame, limits: ServingConfig) -> None:
    """RequestError unless `model_input` has `task`'s columns and at most `max_rows` rows."""
    inputs = get_task(task, RequestError).inputs
    missing = [name for name, _ in inputs if name not in model_input.columns]
    if missing:
        expected = ", ".join(name for name, _ in inputs)
        raise RequestError(f"request lacks column {missing[0]!r} ({task} expects: {expected})")
    if len(model_input) > limits.max_rows:
        raise RequestError(
            f"request has {len(model_input)} rows, over the limit of {limits.max_rows} "
            "(serving.max_rows)"
        )


def text_columns(task: str) -> list[str]:
    """`task`'s text input columns (the string columns of its signature)."""
    return [name for name, kind in get_task(task, RequestError).inputs if kind == "string"]


def check_text(value: Any, row: int, column: str, limits: ServingConfig) -> str:
    """One request text, unless it is not a string or is over `max_text_chars` characters.

    Only the length of the Python string is read: nothing is tokenised yet.
    """
    if not isinstance(value, str):
        got = "null" if _missing(value) else type(value).__name__
        raise RequestError(f"row {row}: {column} must be a string, got {got}")
    if len(value) > limits.max_text_chars:
        raise RequestError(
            f"row {row}: {column} is {len(value)} characters, over the limit of "
            f"{limits.max_text_chars} (serving.max_text_chars)"
        )
    return value


def decode_image(data: Any, row: int, max_pixels: int, transform: Any = None) -> Any:
    """One request image as an RGB PIL image, fitted by `transform` (an `ImageTransform`) if given.

    The pixel count comes from the header, before any pixel is decoded: a few KB of
    compressed PNG can hold gigabytes of pixels. RequestError names the row otherwise.
    """
    from PIL import Image

    if not isinstance(data, bytes | bytearray | memoryview):
        raise RequestError(f"row {row}: image must be binary, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(
                    f"row {row}: image is {width}x{height} = {width * height} pixels, over the "
                    f"limit of {max_pixels} (serving.max_image_pixels)"
                )
            if transform is None:
                return img.convert("RGB")
            return transform.fit(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # PIL's messages may name internal objects; the row and the kind of failure suffice
        raise RequestError(f"row {row}: image is not a decodable image") from e


class VLPTaskModel(mlflow.pyfunc.PythonModel):
    """Pyfunc over a task predictor loaded from the `model_dir` artifact.

    `model_config` holds `task`, the `serving` limits (`max_image_pixels`, `max_rows`,
    `max_text_chars`, `max_text_tokens`, from params.yaml when the model was registered)
    and `loader` ("module:function", default `vlp.tasks.predictor.load_predictor`), which
    returns an object with `caption(images)`, `answer(images, questions)` and
    `score(images, texts) -> [N, M]` as the task needs. A predictor with a `transform`
    (`vlp.data.images.ImageTransform`) gets images already fitted by it, as soon as each is
    decoded; one with `count_tokens(texts) -> [int]` has every text checked against
    `max_text_tokens` before it runs.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.task = context.model_config["task"]
        self.limits = serving_limits(context.model_config)
        module, func = context.model_config.get("loader", DEFAULT_LOADER).split(":")
        self.predictor = getattr(importlib.import_module(module), func)(
            context.artifacts["model_dir"]
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """One prediction per row of `model_input`.

        A bad request raises MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when served) with
        the one-line reason; any other failure INTERNAL_ERROR (HTTP 500) naming only the
        kind of error, its traceback logged. Neither carries a stack trace to the client.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        try:
            return self._predict(model_input, dict(params or {}))
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        except Exception as e:
            log.exception("%s model failed on a request", self.task)
            raise MlflowException(
                f"the {self.task} model failed on this request ({type(e).__name__}); "
                "the server log has the details",
                error_code=INTERNAL_ERROR,
            ) from e

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        spec = get_task(self.task)
        own = spec.output[0]
        output = params.pop("output", None) or own
        if output == EMBEDDING and spec.embeddings:
            return pd.DataFrame({EMBEDDING: self._embeddings(model_input)})
        if output != own:
            raise RequestError(
                f"params output {output!r}: expected {own!r}"
                + (f" or {EMBEDDING!r}" if spec.embeddings else "")
            )
        check_request(self.task, model_input, self.limits)
        rows = range(len(model_input))
        texts = {c: self._texts(model_input, c, rows) for c in text_columns(self.task)}
        takes_images = any(kind == "binary" for _, kind in spec.inputs)
        images = self._images(model_input, rows) if takes_images else []
        own_params = {name: params[name] for name, _ in spec.request_params if name in params}
        answer = spec.module().serve(self.predictor, images, texts, own_params, self.limits)
        return pd.DataFrame(answer)

    def _embeddings(self, model_input: pd.DataFrame) -> list[list[float]]:
        """The L2-normalised embedding of each row's image or text, in row order."""
        if len(model_input) > self.limits.max_rows:
            raise RequestError(
                f"request has {len(model_input)} rows, over the limit of "
                f"{self.limits.max_rows} (serving.max_rows)"
            )

        def given(column: str) -> list[bool]:
            if column not in model_input.columns:
                return [False] * len(model_input)
            return [not _missing(v) for v in model_input[column]]

        has_image, has_text = given("image"), given("text")
        for row, (i, t) in enumerate(zip(has_image, has_text, strict=True)):
            if i == t:
                raise RequestError(
                    f"row {row}: an embedding request row holds an image or a text, "
                    f"not {'both' if i else 'neither'}"
                )
        image_rows = [r for r, i in enumerate(has_image) if i]
        text_rows = [r for r, t in enumerate(has_text) if t]
        texts = self._texts(model_input, "text", text_rows)
        images = self._images(model_input, image_rows)
        out: list[list[float]] = [[] for _ in range(len(model_input))]
        if image_rows:
            for r, vec in zip(image_rows, self.predictor.embed_images(images), strict=True):
                out[r] = [float(x) for x in vec]
        if text_rows:
            for r, vec in zip(text_rows, self.predictor.embed_texts(texts), strict=True):
                out[r] = [float(x) for x in vec]
        return out

    def _texts(self, model_input: pd.DataFrame, column: str, rows: Sequence[int]) -> list[str]:
        """`column`'s texts at `rows`, within `max_text_chars` and, where the predictor
        counts tokens, `max_text_tokens`; RequestError naming the first row over."""
        texts = [check_text(model_input[column].iloc[r], r, column, self.limits) for r in rows]
        count_tokens = getattr(self.predictor, "count_tokens", None)
        if count_tokens is None or not texts:
            return texts
        for row, n in zip(rows, count_tokens(texts), strict=True):
            if n > self.limits.max_text_tokens:
                raise RequestError(
                    f"row {row}: {column} is {n} tokens, over the limit of "
                    f"{self.limits.max_text_tokens} (serving.max_text_tokens)"
                )
        return texts

    def _images(self, model_input: pd.DataFrame, rows: Sequence[int]) -> list[Any]:
        """The images at `rows`, decoded one at a time and fitted by the predictor's transform."""
        if not rows:  # an embedding request of texts alone has no image column
            return []
        transform = getattr(self.predictor, "transform", None)
        column = model_input["image"]
        return [
            decode_image(column.iloc[r], r, self.limits.max_image_pixels, transform) for r in rows
        ]


def _missing(value: Any) -> bool:
    """Whether a request cell is absent (None or NaN)."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def serving_limits(model_config: dict[str, Any]) -> ServingConfig:
    """The request limits recorded in a logged model's `model_config`."""
    keys = [f.name for f in dataclasses.fields(ServingConfig)]
    missing = [k for k in keys if k not in model_config]
    if missing:
        raise RegistryError(
            f"model_config: missing key {missing[0]} (serving limits); register the model "
            "again to record them"
        )
    types = typing.get_type_hints(ServingConfig)
    return ServingConfig(**{k: types[k](model_config[k]) for k in keys})


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, taken from this environment."""
    pkgs = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas"]
    pkgs += ["diffusers", "peft"]  # the generation task's generators; any task's adapters
    reqs = []
    for pkg in pkgs:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _settings(task: str, model_dir: Path) -> dict[str, Any] | None:
    """The task.json of a model whose task has request params (their defaults), else None."""
    from vlp.io import load_json
    from vlp.tasks import TASK_FILE

    if not get_task(task, RegistryError).request_params:
        return None
    return load_json(Path(model_dir) / TASK_FILE, RegistryError)


def log_task_model(
    task: str,
    model_dir: Path,
    *,
    registered_model_name: str | None = None,
    loader: str = DEFAULT_LOADER,
    limits: ServingConfig,
    extra_code_paths: list[Path] | None = None,
) -> Any:
    """Log `model_dir` as a pyfunc in the active run (and register it); return ModelInfo.

    `vlp` travels as code (`code_paths`), so the model loads and serves with
    `--env-manager local` in any environment that has vlp's dependencies. The request
    `limits` (params.yaml's `serving`) travel in `model_config`.
    """
    code_paths = [str(VLP_PACKAGE_DIR), *(str(p) for p in extra_code_paths or [])]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(VLP_PACKAGE_DIR / "pyfunc_entry.py"),
        model_config={
            "task": task,
            "loader": loader,
            **dataclasses.asdict(limits),
        },
        artifacts={"model_dir": str(model_dir)},
        code_paths=code_paths,
        signature=task_signature(task, _settings(task, model_dir)),
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
