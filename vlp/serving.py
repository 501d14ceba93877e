"""A finetuned task model as an MLflow pyfunc: servable with `mlflow models serve`.

The pyfunc carries the task model directory (weights, tokenizer, config) as an artifact
and the `vlp` package as code, and answers one row per request item:

| task       | inputs                          | output            |
|------------|---------------------------------|-------------------|
| captioning | image (binary)                  | caption (string)  |
| vqa        | image (binary), question (str)  | answer (string)   |
| retrieval  | image (binary), text (str)      | score (double)    |

Over REST, binary columns travel base64-encoded; MLflow decodes them using the signature.
"""

from __future__ import annotations

import importlib
import io
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from vlp.config import TASKS
from vlp.errors import RegistryError

DEFAULT_LOADER = "vlp.tasks:load_predictor"
VLP_PACKAGE_DIR = Path(__file__).resolve().parent

INPUTS = {
    "captioning": [("image", "binary")],
    "vqa": [("image", "binary"), ("question", "string")],
    "retrieval": [("image", "binary"), ("text", "string")],
}
OUTPUTS = {
    "captioning": ("caption", "string"),
    "vqa": ("answer", "string"),
    "retrieval": ("score", "double"),
}


def task_signature(task: str) -> Any:
    """The MLflow signature of `task`'s pyfunc (see the table in the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if task not in TASKS:
        raise RegistryError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    out_name, out_type = OUTPUTS[task]
    return ModelSignature(
        inputs=Schema([ColSpec(t, n) for n, t in INPUTS[task]]),
        outputs=Schema([ColSpec(out_type, out_name)]),
    )


def _decode_images(values: pd.Series) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(bytes(v))).convert("RGB") for v in values]


class VLPTaskModel(mlflow.pyfunc.PythonModel):
    """Pyfunc over a task predictor loaded from the `model_dir` artifact.

    `model_config` holds `task` and `loader` ("module:function", default
    `vlp.tasks.load_predictor`), which returns an object with `caption(images)`,
    `answer(images, questions)` and `score(images, texts) -> [N, M]` as the task needs.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.task = context.model_config["task"]
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
        images = _decode_images(model_input["image"])
        if self.task == "captioning":
            return pd.DataFrame({"caption": list(self.predictor.caption(images))})
        if self.task == "vqa":
            answers = self.predictor.answer(images, list(model_input["question"]))
            return pd.DataFrame({"answer": list(answers)})
        # one (image, text) pair per row: the diagonal of the image x text score matrix
        scores = np.asarray(self.predictor.score(images, list(model_input["text"])))
        return pd.DataFrame({"score": np.diagonal(scores).astype(float)})


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
    extra_code_paths: list[Path] | None = None,
) -> Any:
    """Log `model_dir` as a pyfunc in the active run (and register it); return ModelInfo.

    `vlp` travels as code (`code_paths`), so the model loads and serves with
    `--env-manager local` in any environment that has vlp's dependencies.
    """
    code_paths = [str(VLP_PACKAGE_DIR), *(str(p) for p in extra_code_paths or [])]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(VLP_PACKAGE_DIR / "pyfunc_entry.py"),
        model_config={"task": task, "loader": loader},
        artifacts={"model_dir": str(model_dir)},
        code_paths=code_paths,
        signature=task_signature(task),
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
