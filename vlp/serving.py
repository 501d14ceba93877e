"""A finetuned task model as an MLflow pyfunc: servable with `mlflow models serve`.

The pyfunc carries the task model directory (weights, tokenizer, config) as an artifact
and the `vlp` package as code, and answers one row per request item:

| task       | inputs                          | output            |
|------------|---------------------------------|-------------------|
| captioning | image (binary)                  | caption (string)  |
| vqa        | image (binary), question (str)  | answer (string)   |
| retrieval  | image (binary), text (str)      | score (double)    |

(each task declares its columns: `inputs` and `output` of `vlp.tasks.<task>.TASK`)

The retrieval model also answers embedding requests: with `params={"output": "embedding"}`
each row holds an `image` or a `text` (the other left out or null) and the answer is its
L2-normalised ITC embedding (`embedding`, a list of floats), the vectors `vlp embed` writes.

Over REST, binary columns travel base64-encoded; MLflow decodes them using the signature.

Requests are bounded by the `serving` limits recorded in the model at registration: at
most `max_rows` rows, and images of at most `max_image_pixels` pixels, checked from the
image header before any pixel is decoded. Images are decoded one at a time and shrunk to
the model's input size straight away. A request that breaks a limit, lacks a column or
holds bytes that are not an image is refused with MLflow's HTTP 400 and a one-line reason
naming the row, without a stack trace.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
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


# Tasks whose pyfunc also returns embeddings (`params={"output": EMBEDDING}`): rows of an
# `image` or a `text`, the retrieval inputs.
EMBEDDING_TASKS = ("retrieval",)
EMBEDDING = "embedding"


def task_signature(task: str) -> Any:
    """The MLflow signature of `task`'s pyfunc (see the table in the module docstring).

    An embedding task's columns are optional (an embedding row holds one of them) and its
    `output` param chooses the answer: the task's own (default) or `embedding`.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    spec = get_task(task, RegistryError)
    out_name, out_type = spec.output
    if task not in EMBEDDING_TASKS:
        return ModelSignature(
            inputs=Schema([ColSpec(t, n) for n, t in spec.inputs]),
            outputs=Schema([ColSpec(out_type, out_name)]),
        )
    return ModelSignature(
        inputs=Schema([ColSpec(t, n, required=False) for n, t in spec.inputs]),
        outputs=Schema([ColSpec(out_type, out_name)]),
        params=ParamSchema([ParamSpec("output", "string", out_name)]),
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
        from params.yaml when the model was registered) and `loader`
        ("module:function", default `vlp.tasks.predictor.load_predictor`), which returns an object with
        `caption(images)`, `answer(images, questions)` and `score(images, texts) -> [N, M]` as
        the task needs. A predictor with a `transform` (`vlp.data.images.ImageTransform`) gets
    images already fitted by it, as soon as each is decoded.
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
        the one-line reason and no stack trace.
        """
        from mlflow.exceptions import MlflowException

        output = (params or {}).get("output") or get_task(self.task).output[0]
        try:
            if output == EMBEDDING and self.task in EMBEDDING_TASKS:
                return pd.DataFrame({EMBEDDING: self._embeddings(model_input)})
            if output != get_task(self.task).output[0]:
                raise RequestError(
                    f"params output {output!r}: expected {get_task(self.task).output[0]!r}"
                    + (f" or {EMBEDDING!r}" if self.task in EMBEDDING_TASKS else "")
                )
            images = self._images(model_input)
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        if self.task == "captioning":
            return pd.DataFrame({"caption": list(self.predictor.caption(images))})
        if self.task == "vqa":
            answers = self.predictor.answer(images, list(model_input["question"]))
            return pd.DataFrame({"answer": list(answers)})
        # one (image, text) pair per row: the diagonal of the image x text score matrix
        scores = np.asarray(self.predictor.score(images, list(model_input["text"])))
        return pd.DataFrame({"score": np.diagonal(scores).astype(float)})

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
        transform = getattr(self.predictor, "transform", None)
        image_rows = [r for r, i in enumerate(has_image) if i]
        text_rows = [r for r, t in enumerate(has_text) if t]
        images = [
            decode_image(model_input["image"].iloc[r], r, self.limits.max_image_pixels, transform)
            for r in image_rows
        ]
        texts = [str(model_input["text"].iloc[r]) for r in text_rows]
        out: list[list[float]] = [[] for _ in range(len(model_input))]
        if image_rows:
            for r, vec in zip(image_rows, self.predictor.embed_images(images), strict=True):
                out[r] = [float(x) for x in vec]
        if text_rows:
            for r, vec in zip(text_rows, self.predictor.embed_texts(texts), strict=True):
                out[r] = [float(x) for x in vec]
        return out

    def _images(self, model_input: pd.DataFrame) -> list[Any]:
        check_request(self.task, model_input, self.limits)
        transform = getattr(self.predictor, "transform", None)
        return [
            decode_image(data, row, self.limits.max_image_pixels, transform)
            for row, data in enumerate(model_input["image"])
        ]


def _missing(value: Any) -> bool:
    """Whether a request cell is absent (None or NaN)."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def serving_limits(model_config: dict[str, Any]) -> ServingConfig:
    """The request limits recorded in a logged model's `model_config`."""
    missing = [k for k in ("max_image_pixels", "max_rows") if k not in model_config]
    if missing:
        raise RegistryError(f"model_config: missing key {missing[0]} (serving limits)")
    return ServingConfig(
        max_image_pixels=int(model_config["max_image_pixels"]),
        max_rows=int(model_config["max_rows"]),
    )


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, taken from this environment."""
    pkgs = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas"]
    reqs = []
    for pkg in pkgs:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


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
        signature=task_signature(task),
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
