"""Captioning: references from manifests, beam-search captions through the predictor."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from vlp.tasks.captioning.task import Predictor, references


def test_references_group_captions_by_image() -> None:
    pairs = pd.DataFrame({"image_id": [2, 1, 2], "caption": ["b", "a", "c"]})
    assert references(pairs) == {1: ["a"], 2: ["b", "c"]}


def test_predictor_captions_every_image_across_batches(tiny_vlp, tmp_path: Path) -> None:
    info = {"task": "captioning", "image_size": 32, "beam_size": 2, "max_length": 4}
    predictor = Predictor(tiny_vlp, info, tmp_path, batch_size=2)
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    out = predictor.caption(images)
    assert len(out) == 3 and all(isinstance(c, str) for c in out)
    assert out == [c for img in images for c in predictor.caption([img])]  # batches do not mix
