"""BLEU-1..4, ROUGE-L and CIDEr-D exactly as the MS-COCO caption evaluation toolkit computes them.

Inputs are raw captions; they are PTB-tokenised as the toolkit does (see `vlp.metrics.ptb`).
BLEU uses the 'closest' reference length and the toolkit's tiny/small smoothing; ROUGE-L is
the LCS F-measure (beta 1.2) of the best precision and best recall over references; CIDEr-D
uses n=1..4, sigma 6, clipped tf-idf, the toolkit's length penalty (its "length" counts
bigrams), document frequencies from the evaluated references, x10. METEOR and SPICE (Java
tools) are not computed.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from torchmetrics import Metric

from vlp.errors import ResultsError
from vlp.metrics.ptb import tokenize_caption
from vlp.metrics.string_state import decode_strings, encode_strings

N = 4
SIGMA = 6.0
BETA = 1.2
_TINY, _SMALL = 1e-15, 1e-9  # the toolkit's BLEU smoothing constants
CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def _ngrams(tokens: list[str]) -> Counter:
    """Counts of every 1..4-gram (as tuples) of a token list."""
    return Counter(
        tuple(tokens[i : i + k]) for k in range(1, N + 1) for i in range(len(tokens) - k + 1)
    )


def _bleu(hyps: list[list[str]], refs: list[list[list[str]]], hyp_ng, ref_ng) -> tuple[list, list]:
    """Corpus BLEU-1..4 and per-image BLEU-1..4 (toolkit's compute_score, option 'closest')."""
    stats = np.zeros((len(hyps), 2 + 2 * N))  # testlen, reflen, guess[N], correct[N]
    for i, (hyp, rs) in enumerate(zip(hyps, refs, strict=True)):
        maxref: Counter = Counter()
        for ng in ref_ng[i]:
            maxref |= ng
        testlen = len(hyp)
        correct = [0] * N
        for gram, count in hyp_ng[i].items():
            correct[len(gram) - 1] += min(maxref.get(gram, 0), count)
        reflen = min((abs(len(r) - testlen), len(r)) for r in rs)[1]
        stats[i] = [testlen, reflen, *(max(0, testlen - k) for k in range(N)), *correct]

    def score(testlen, reflen, guess, correct) -> np.ndarray:
        precisions = (correct + _TINY) / (guess + _SMALL)
        bleu = np.cumprod(precisions, axis=-1) ** (1.0 / np.arange(1, N + 1))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
        return bleu * np.asarray(penalty)[..., None]

    total = stats.sum(axis=0)
    corpus = score(total[0], total[1], total[2 : 2 + N], total[2 + N :])
    per_image = score(stats[:, 0], stats[:, 1], stats[:, 2 : 2 + N], stats[:, 2 + N :])
    return corpus.tolist(), per_image.T.tolist()


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


def _rouge_l(hyp: str, refs: list[str]) -> float:
    """ROUGE-L of one caption; the toolkit splits on single spaces, so '' is one empty token."""
    cand = hyp.split(" ")
    prec, rec = 0.0, 0.0
    for ref in refs:
        tokens = ref.split(" ")
        lcs = _lcs(tokens, cand)
        prec, rec = max(prec, lcs / len(cand)), max(rec, lcs / len(tokens))
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + BETA**2) * prec * rec / (rec + BETA**2 * prec)


def _cider_d(hyp_ng: list[Counter], ref_ng: list[list[Counter]]) -> np.ndarray:
    """Per-image CIDEr-D, vectorised over all (image, reference, n-gram) entries."""
    n_images = len(hyp_ng)
    doc_freq: Counter = Counter()
    for refs in ref_ng:
        doc_freq.update(set().union(*refs))
    vocab: dict[tuple, int] = {}
    # Flatten sentences: hypotheses first (index i), then every reference.
    sent_image = list(range(n_images)) + [i for i, refs in enumerate(ref_ng) for _ in refs]
    sentences = list(hyp_ng) + [ng for refs in ref_ng for ng in refs]
    ids, orders, counts, owner = [], [], [], []
    for s, ng in enumerate(sentences):
        for gram, count in ng.items():
            ids.append(vocab.setdefault(gram, len(vocab)))
            orders.append(len(gram) - 1)
            counts.append(count)
            owner.append(s)
    ids_a, order_a, owner_a = np.array(ids), np.array(orders), np.array(owner)
    counts_a = np.array(counts, dtype=np.float64)
    df = np.zeros(len(vocab))
    for gram, i in vocab.items():
        df[i] = doc_freq.get(gram, 0)
    ref_len = math.log(float(n_images))
    weight = counts_a * (ref_len - np.log(np.maximum(1.0, df[ids_a])))
    n_sent = len(sentences)
    norm = np.sqrt(np.bincount(owner_a * N + order_a, weight**2, minlength=n_sent * N)).reshape(
        n_sent, N
    )
    # The toolkit's "length" is the number of bigrams.
    length = np.bincount(owner_a, counts_a * (order_a == 1), minlength=n_sent)
    image_a = np.array(sent_image)
    # Look each reference entry's n-gram up in its image's hypothesis.
    is_hyp = owner_a < n_images
    key = image_a[owner_a] * len(vocab) + ids_a
    hyp_keys, hyp_w = key[is_hyp], weight[is_hyp]
    order_sort = np.argsort(hyp_keys)
    hyp_keys, hyp_w = hyp_keys[order_sort], hyp_w[order_sort]
    ref_idx = np.nonzero(~is_hyp)[0]
    pos = np.searchsorted(hyp_keys, key[ref_idx])
    pos_c = np.minimum(pos, max(len(hyp_keys) - 1, 0))
    found = (pos < len(hyp_keys)) & (hyp_keys[pos_c] == key[ref_idx]) if len(hyp_keys) else pos < 0
    w_ref = weight[ref_idx]
    contrib = np.where(found, np.minimum(hyp_w[pos_c], w_ref) * w_ref, 0.0)
    val = np.bincount(
        owner_a[ref_idx] * N + order_a[ref_idx], contrib, minlength=n_sent * N
    ).reshape(n_sent, N)[n_images:]
    ref_owner_image = image_a[n_images:]
    denom = norm[ref_owner_image] * norm[n_images:]
    val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
    delta = length[ref_owner_image] - length[n_images:]
    val = val * np.exp(-(delta**2) / (2 * SIGMA**2))[:, None]
    per_ref = val.mean(axis=1)
    n_refs = np.bincount(ref_owner_image, minlength=n_images)
    return np.bincount(ref_owner_image, per_ref, minlength=n_images) / n_refs * 10.0


def score_tokenized(
    hyps: list[str], refs: list[list[str]], per_image: bool = False
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, float]]]:
    """Toolkit scores of already-tokenised captions: one hypothesis and >= 1 references each."""
    if not hyps:
        raise ResultsError("no captions to score")
    for i, rs in enumerate(refs):
        if not rs:
            raise ResultsError(f"caption #{i} has no reference captions")
    hyp_tokens = [h.split() for h in hyps]
    ref_tokens = [[r.split() for r in rs] for rs in refs]
    hyp_ng = [_ngrams(t) for t in hyp_tokens]
    ref_ng = [[_ngrams(t) for t in rs] for rs in ref_tokens]
    bleu, bleu_per_image = _bleu(hyp_tokens, ref_tokens, hyp_ng, ref_ng)
    rouge = [_rouge_l(h, rs) for h, rs in zip(hyps, refs, strict=True)]
    cider = _cider_d(hyp_ng, ref_ng)
    corpus = {f"Bleu_{k + 1}": float(bleu[k]) for k in range(N)}
    corpus["ROUGE_L"] = float(np.mean(rouge))
    corpus["CIDEr"] = float(np.mean(cider))
    if not per_image:
        return corpus
    rows = [
        {
            **{f"Bleu_{k + 1}": bleu_per_image[k][i] for k in range(N)},
            "ROUGE_L": rouge[i],
            "CIDEr": float(cider[i]),
        }
        for i in range(len(hyps))
    ]
    return corpus, rows


def score_captions(results: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """COCO toolkit scores of one raw caption per image against that image's raw references.

    Every image in `results` needs references; references of other images are ignored (as the
    toolkit does), so CIDEr-D document frequencies come from the evaluated images only.
    """
    missing = [i for i in results if i not in references]
    if missing:
        raise ResultsError(
            f"no reference captions for image_id {missing[0]} ({len(missing)} images)"
        )
    ids = list(results)
    hyps = [tokenize_caption(results[i]) for i in ids]
    refs = [[tokenize_caption(r) for r in references[i]] for i in ids]
    return score_tokenized(hyps, refs)


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
        counts = (
            torch.cat(self.refs_per_caption).tolist()
            if isinstance(self.refs_per_caption, list)
            else self.refs_per_caption.tolist()
        )
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        refs = [flat[offsets[i] : offsets[i + 1]] for i in range(len(hyps))]
        return score_tokenized(hyps, refs)
