"""The registered retrieval model answers embedding requests (`params={"output": "embedding"}`)."""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from tests.checkpoints.vlp import TRANSFORM, tiny_vlp_dir
from tests.mlflow_helpers import evaluated_metrics
from vlp.config import Config
from vlp.registry import register_model


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_embedding_rows_keep_their_order_and_bad_rows_are_refused() -> None:
    from vlp.config import ServingConfig
    from vlp.serving import VLPTaskModel

    class Fixed:
        """Image embeddings (1, 0, width), text embeddings (0, 1, length)."""

        def embed_images(self, images: list) -> np.ndarray:
            return np.array([[1.0, 0.0, im.size[0]] for im in images], dtype=np.float32)

        def embed_texts(self, texts: list[str]) -> np.ndarray:
            return np.array([[0.0, 1.0, len(t)] for t in texts], dtype=np.float32)

    model = VLPTaskModel()
    limits = ServingConfig(
        max_image_pixels=600,
        max_rows=3,
        max_text_chars=9,
        max_text_tokens=9,
        max_generation_prompts=2,
        max_generation_steps=5,
        max_guidance_scale=4.0,
    )
    model.task, model.limits, model.predictor = "retrieval", limits, Fixed()
    frame = pd.DataFrame({"image": [None, _png(0), None], "text": ["abc", None, "hello"]})
    out = model.predict(None, frame, params={"output": "embedding"})
    assert out["embedding"].tolist() == [[0, 1, 3], [1, 0, 28], [0, 1, 5]]
    for bad, why in (
        (pd.DataFrame({"text": [None]}), "row 0: .* not neither"),
        (pd.DataFrame({"text": ["a"] * 4}), "4 rows, over the limit of 3"),
        (pd.DataFrame({"image": [_png(0), b"junk"]}), "row 1: image is not a decodable image"),
    ):
        with pytest.raises(MlflowException, match=why):
            model.predict(None, bad, params={"output": "embedding"})


@pytest.mark.slow  # registers and loads a real model
def test_registered_retrieval_model_returns_the_models_normalised_embeddings(
    store_cfg: Config,
) -> None:
    from vlp.data.images import ImageTransform
    from vlp.models.vlp_model import VLPModel

    model_dir = tiny_vlp_dir(store_cfg, Path("models/retrieval").resolve(), rerank_k=2)
    metrics = evaluated_metrics(model_dir, {"rsum": 1.0})
    register_model(store_cfg, "retrieval", model_dir, metrics)
    served = mlflow.pyfunc.load_model("models:/vlp-retrieval@champion")
    assert served.metadata.get_params_schema().to_dict()[0]["name"] == "output"

    images, texts = [_png(0), _png(1)], ["a red circle", "there is a blue square on the left"]
    request = pd.DataFrame({"image": [images[0], None, images[1]], "text": [None, texts[1], None]})
    out = served.predict(request, params={"output": "embedding"})
    texts_only = served.predict(pd.DataFrame({"text": texts}), params={"output": "embedding"})
    assert list(out.columns) == ["embedding"] and len(out) == 3

    model = VLPModel.from_pretrained(model_dir).eval()
    transform = ImageTransform.from_dict({**TRANSFORM, "size": 32})
    with torch.no_grad():
        pixels = transform.pixels([Image.open(io.BytesIO(b)) for b in images])
        want_images = model.encode_image(pixels)[1].numpy()
        want_texts = np.stack(
            [model.encode_text(**model.tokenize([t]))[1][0].numpy() for t in texts]
        )
    got = np.stack(out["embedding"].map(np.asarray))
    np.testing.assert_allclose(got[[0, 2]], want_images, atol=1e-5)
    np.testing.assert_allclose(got[1], want_texts[1], atol=1e-5)
    np.testing.assert_allclose(
        np.stack(texts_only["embedding"].map(np.asarray)), want_texts, atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    # the default output is still the pair score, and a row must hold exactly one input
    scores = served.predict(pd.DataFrame({"image": images, "text": texts}))
    assert list(scores.columns) == ["score"] and len(scores) == 2
    with pytest.raises(MlflowException, match="row 0: .* not both"):
        served.predict(
            pd.DataFrame({"image": images[:1], "text": texts[:1]}), params={"output": "embedding"}
        )
    with pytest.raises(MlflowException, match="params output 'caption'"):
        served.predict(pd.DataFrame({"image": images, "text": texts}), params={"output": "caption"})
