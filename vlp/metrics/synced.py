"""The metrics as torchmetrics `Metric`s: accumulated over batches, synchronised across processes.

Each computes exactly what its function does (`score_tokenized`, `vqa_accuracy`,
`recall_at_k`) over everything every process has seen. Strings travel as NUL-separated utf-8
bytes in uint8 tensors, so torchmetrics' "cat" reduction syncs them like any other state.
The functions themselves need neither torch nor torchmetrics: the standalone `vlp eval`
commands score files without loading either.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from vlp.errors import ResultsError
from vlp.metrics.caption import score_tokenized
from vlp.metrics.ptb import tokenize_caption
from vlp.metrics.retrieval import recall_at_k
from vlp.metrics.vqa import VQAProtocol, aggregate_accuracies, check_protocol, question_accuracy


def encode_strings(strings: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """One uint8 tensor holding every string followed by a NUL byte."""
    data = b"".join(s.replace("\0", "").encode("utf-8") + b"\0" for s in strings)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if data
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )


def decode_strings(state: torch.Tensor | list[torch.Tensor]) -> list[str]:
    """The strings of an encoded state (a tensor, or a list of them before sync)."""
    if isinstance(state, list):
        state = torch.cat(state) if state else torch.zeros(0, dtype=torch.uint8)
    data = bytes(state.cpu().numpy().tobytes())
    return [s.decode("utf-8") for s in data.split(b"\0")[:-1]]


def _cat(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A list state (before sync) as one tensor; a synced state is one already."""
    return torch.cat(state) if isinstance(state, list) else state


class CaptionMetrics(Metric):
    """BLEU-1..4, ROUGE-L, CIDEr-D over batches, DDP-safe (captions held as utf-8 byte tensors)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hyp_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("ref_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("refs_per_caption", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[str], refs: list[list[str]]) -> None:
        """Add generated captions and their reference captions (raw text, tokenised here)."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} captions but {len(refs)} reference lists")
        self.hyp_bytes.append(encode_strings([tokenize_caption(p) for p in preds], self.device))
        flat = [tokenize_caption(r) for rs in refs for r in rs]
        self.ref_bytes.append(encode_strings(flat, self.device))
        counts = torch.tensor([len(rs) for rs in refs], dtype=torch.long, device=self.device)
        self.refs_per_caption.append(counts)

    def compute(self) -> dict[str, float]:
        """Corpus scores of everything seen (on every process after sync)."""
        hyps = decode_strings(self.hyp_bytes)
        flat = decode_strings(self.ref_bytes)
        counts = _cat(self.refs_per_caption).tolist()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        refs = [flat[offsets[i] : offsets[i + 1]] for i in range(len(hyps))]
        return score_tokenized(hyps, refs)


class VQAAccuracy(Metric):
    """VQA v2 accuracy over batches; per-question accuracies plus type names as byte tensors.

    `protocol` picks the answer normalisation (`vlp.metrics.vqa`): `official` or `lavis`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, protocol: VQAProtocol = "official", **kwargs) -> None:
        super().__init__(**kwargs)
        check_protocol(protocol)
        self.protocol = protocol
        self.add_state("accuracy", default=[], dist_reduce_fx="cat")
        self.add_state("answer_type_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("question_type_bytes", default=[], dist_reduce_fx="cat")

    def update(
        self,
        preds: list[str],
        answers: list[list[str]],
        answer_types: list[str] | None = None,
        question_types: list[str] | None = None,
    ) -> None:
        """Add predicted answers with their ground-truth answers (and optional types)."""
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions but {len(answers)} answer lists")
        accs = [question_accuracy(p, a, self.protocol) for p, a in zip(preds, answers, strict=True)]
        self.accuracy.append(torch.tensor(accs, dtype=torch.float64, device=self.device))
        self.answer_type_bytes.append(
            encode_strings(answer_types or ["all"] * len(preds), self.device)
        )
        self.question_type_bytes.append(
            encode_strings(question_types or ["all"] * len(preds), self.device)
        )

    def compute(self) -> dict:
        """{"overall", "perAnswerType", "perQuestionType"} in percent, as the official script."""
        acc = _cat(self.accuracy)
        if acc.numel() == 0:
            raise ResultsError("VQAAccuracy.compute() called before any update()")
        return aggregate_accuracies(
            acc.tolist(),
            decode_strings(self.answer_type_bytes),
            decode_strings(self.question_type_bytes),
        )


class RetrievalRecall(Metric):
    """Recall@K over batches of (image, text) embeddings; images are de-duplicated by id."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("image_embeds", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("text_embeds", default=[], dist_reduce_fx="cat")
        self.add_state("text_image_ids", default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_embeds: torch.Tensor,
        image_ids: torch.Tensor,
        text_embeds: torch.Tensor,
        text_image_ids: torch.Tensor,
    ) -> None:
        """Add image embeddings [B, D] with ids [B] and text embeddings [T, D] with their image ids [T].

        An image may appear in several batches (e.g. once per caption); the first copy is used.
        Similarity is the dot product, so pass normalised embeddings for cosine similarity.
        """
        if (
            image_embeds.shape[0] != image_ids.shape[0]
            or text_embeds.shape[0] != text_image_ids.shape[0]
        ):
            raise ValueError("embeddings and ids must have the same length")
        self.image_embeds.append(image_embeds.detach().float())
        self.image_ids.append(image_ids.detach().long())
        self.text_embeds.append(text_embeds.detach().float())
        self.text_image_ids.append(text_image_ids.detach().long())

    def compute(self) -> dict[str, float]:
        """Recall dict of `recall_at_k` over everything seen (on every process after sync)."""
        img, ids, txt, tids = (
            _cat(self.image_embeds),
            _cat(self.image_ids),
            _cat(self.text_embeds),
            _cat(self.text_image_ids),
        )
        uniq, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
        row = torch.searchsorted(uniq, tids)
        if (row >= len(uniq)).any() or (uniq[row.clamp(max=len(uniq) - 1)] != tids).any():
            raise ResultsError("a text's image id has no image embedding")
        return recall_at_k(img[first] @ txt.T, row)
