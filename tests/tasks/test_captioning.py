"""Captioning: references from manifests, beam-search generation, COCO results JSON."""

from __future__ import annotations

import pandas as pd
import torch

from vlp.tasks.captioning import generate, references


def test_references_group_captions_by_image() -> None:
    pairs = pd.DataFrame({"image_id": [2, 1, 2], "caption": ["b", "a", "c"]})
    assert references(pairs) == {1: ["a"], 2: ["b", "c"]}


def test_generate_keys_captions_by_image_id(tiny_vlp) -> None:
    batches = [(torch.randn(2, 3, 32, 32), [10, 11]), (torch.randn(1, 3, 32, 32), [12])]
    out = generate(tiny_vlp.eval(), batches, num_beams=2, max_length=4)
    assert sorted(out) == [10, 11, 12]
    assert all(isinstance(c, str) for c in out.values())
