"""A tiny stand-in task predictor with the `vlp.tasks.predictor.load_predictor` interface.

Its answers depend on the model directory (so tests can tell versions apart) and on the
image (so tests can tell that the image really was decoded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StandinPredictor:
    """Captions/answers/scores/images from `standin.json` in the model directory."""

    def __init__(self, model_dir: str) -> None:
        self.spec = json.loads((Path(model_dir) / "standin.json").read_text())

    def caption(self, images: list[Any]) -> list[str]:
        return [f"{self.spec['word']} {im.size[0]}x{im.size[1]}" for im in images]

    def answer(self, images: list[Any], questions: list[str]) -> list[str]:
        return [f"{self.spec['word']} {len(q)}" for q in questions]

    def score(self, images: list[Any], texts: list[str]) -> list[list[float]]:
        return [[float(im.size[0] + len(t)) for t in texts] for im in images]

    @property
    def sampling(self) -> Any:
        from vlp.tasks.generation.task import Sampling

        return Sampling(steps=2, guidance_scale=1.5, num_candidates=1, rerank="none", seed=0)

    def generate(self, prompts: list[str], sampling: Any) -> list[Any]:
        """A grey image per prompt, as wide as the prompt is long and as tall as the steps."""
        from PIL import Image

        return [Image.new("RGB", (len(p), sampling.steps), "gray") for p in prompts]


def load_predictor(model_dir: str) -> StandinPredictor:
    """Load the stand-in predictor saved in `model_dir`."""
    return StandinPredictor(model_dir)
