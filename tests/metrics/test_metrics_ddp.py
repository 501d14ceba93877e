"""The metrics sync across 2 DDP processes (gloo, CPU) and equal the single-process result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.metrics import recall_at_k, score_captions, vqa_accuracy
from vlp.metrics.synced import CaptionMetrics, RetrievalRecall, VQAAccuracy

pytestmark = pytest.mark.slow  # two processes

CAPTIONS = {
    i: f"a {c} car on a road number {i}"
    for i, c in enumerate(["red", "blue", "green", "old", "small"])
}
REFS = {
    i: [f"a {c} car on the road", "a vehicle on a street", f"the {c} car"]
    for i, c in enumerate(["red", "blue", "grey", "old", "big"])
}
ANSWERS = {1: ["2"] * 10, 2: ["yes"] * 2 + ["no"] * 8, 3: ["red"] * 10}
PREDS = {1: "two", 2: "yes", 3: "red"}
TYPES = {1: "number", 2: "yes/no", 3: "other"}


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 4, generator=gen)
    return images, images.repeat_interleave(5, dim=0) + torch.randn(30, 4, generator=gen)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        caption, vqa, recall = CaptionMetrics(), VQAAccuracy(), RetrievalRecall()
        mine = [i for i in CAPTIONS if i % 2 == rank]  # uneven split: 3 and 2 captions
        caption.update([CAPTIONS[i] for i in mine], [REFS[i] for i in mine])
        qids = [q for q in ANSWERS if q % 2 == rank]
        vqa.update([PREDS[q] for q in qids], [ANSWERS[q] for q in qids], [TYPES[q] for q in qids])
        images, texts = _embeddings()
        rows = torch.arange(30)[rank::2] // 5
        recall.update(images[rows], rows, texts[rank::2], rows)
        result = {"caption": caption.compute(), "vqa": vqa.compute(), "recall": recall.compute()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_process_sync_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    images, texts = _embeddings()
    # Texts were split by parity, so rank-order concatenation permutes them; undo that here.
    order = torch.cat([torch.arange(30)[0::2], torch.arange(30)[1::2]])
    expected = {
        "caption": score_captions(CAPTIONS, REFS),
        "vqa": vqa_accuracy(PREDS, ANSWERS, TYPES),
        "recall": recall_at_k(images @ texts[order].T, order // 5),
    }
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["vqa"] == expected["vqa"]
        assert got["recall"] == expected["recall"]
        for key, value in expected["caption"].items():
            assert abs(got["caption"][key] - value) < 1e-12, key
