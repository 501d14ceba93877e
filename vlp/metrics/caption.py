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

from vlp.errors import ResultsError
from vlp.metrics.ptb import tokenize_caption

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


def _bleu(hyps: list[list[str]], refs: list[list[list[str]]], entries: tuple) -> tuple[list, list]:
    """Corpus BLEU-1..4 and per-image BLEU-1..4 (toolkit's compute_score, option 'closest').

    A hypothesis n-gram's count is clipped by its largest count in one of the image's
    references; counted over `_ngram_entries`, as CIDEr-D is.
    """
    n_images = len(hyps)
    sent_image, owner, gram, order, counts, df = entries
    n_grams = len(df)
    is_ref = owner >= n_images
    # largest count of each (image, n-gram) over the image's references: the last of its
    # run once sorted by (key, count); a sentinel key -1 keeps the lookup valid when empty
    ref_key = sent_image[owner[is_ref]] * n_grams + gram[is_ref]
    ref_count = counts[is_ref]
    sort = np.lexsort((ref_count, ref_key))
    ref_key, ref_count = ref_key[sort], ref_count[sort]
    last = np.concatenate([ref_key[1:] != ref_key[:-1], [True]])[: len(ref_key)]
    max_key = np.concatenate([[-1], ref_key[last]])
    max_count = np.concatenate([[0.0], ref_count[last]])
    hyp_key = owner[~is_ref] * n_grams + gram[~is_ref]
    pos = np.minimum(np.searchsorted(max_key, hyp_key), len(max_key) - 1)
    clipped = np.where(max_key[pos] == hyp_key, np.minimum(counts[~is_ref], max_count[pos]), 0)
    correct = np.bincount(
        owner[~is_ref] * N + order[~is_ref], clipped, minlength=n_images * N
    ).reshape(n_images, N)
    testlen = np.array([len(h) for h in hyps], dtype=np.float64)
    guess = np.maximum(0.0, testlen[:, None] - np.arange(N))
    # 'closest': the reference length nearest the hypothesis', the shorter one on a tie
    ref_len = np.array([len(r) for rs in refs for r in rs], dtype=np.int64)
    ref_image = np.repeat(np.arange(n_images), [len(rs) for rs in refs])
    gap = np.abs(ref_len - testlen[ref_image].astype(np.int64))
    rank = gap * (int(ref_len.max(initial=0)) + 1) + ref_len
    offsets = np.concatenate([[0], np.cumsum([len(rs) for rs in refs])[:-1]])
    best = np.minimum.reduceat(rank, offsets)
    reflen = (best % (int(ref_len.max(initial=0)) + 1)).astype(np.float64)

    def score(testlen, reflen, guess, correct) -> np.ndarray:
        precisions = (correct + _TINY) / (guess + _SMALL)
        bleu = np.cumprod(precisions, axis=-1) ** (1.0 / np.arange(1, N + 1))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
        return bleu * np.asarray(penalty)[..., None]

    corpus = score(testlen.sum(), reflen.sum(), guess.sum(axis=0), correct.sum(axis=0))
    per_image = score(testlen, reflen, guess, correct)
    return corpus.tolist(), per_image.T.tolist()


def _bit_masks(tokens: list[str]) -> dict[str, int]:
    """Per distinct token, the bit set of its positions in `tokens`."""
    masks: dict[str, int] = {}
    for j, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << j)
    return masks


def _lcs(a: list[str], masks: dict[str, int], length: int) -> int:
    """Length of the longest common subsequence of `a` and the `length` tokens of `masks`.

    Bit-parallel (Crochemore et al. 2001): one big-integer step per token of `a` instead of
    a row of the dynamic programme; the zero bits of `v` count the common subsequence.
    """
    full = (1 << length) - 1
    v = full
    for x in a:
        m = masks.get(x)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


def _rouge_l(hyp: str, refs: list[str]) -> float:
    """ROUGE-L of one caption; the toolkit splits on single spaces, so '' is one empty token."""
    cand = hyp.split(" ")
    masks = _bit_masks(cand)
    prec, rec = 0.0, 0.0
    for ref in refs:
        tokens = ref.split(" ")
        lcs = _lcs(tokens, masks, len(cand))
        prec, rec = max(prec, lcs / len(cand)), max(rec, lcs / len(tokens))
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + BETA**2) * prec * rec / (rec + BETA**2 * prec)


def _ngram_entries_dict(hyps: list[list[str]], refs: list[list[list[str]]]):
    """`_ngram_entries` with tuple n-grams in dicts (for vocabularies too large for int keys)."""
    sentences = [_ngrams(h) for h in hyps] + [_ngrams(r) for rs in refs for r in rs]
    sent_image = list(range(len(hyps))) + [i for i, rs in enumerate(refs) for _ in rs]
    vocab: dict[tuple, int] = {}
    rows = [
        (s, vocab.setdefault(g, len(vocab)), len(g) - 1, c)
        for s, ng in enumerate(sentences)
        for g, c in ng.items()
    ]
    owner, ids, order, counts = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    df = np.zeros(len(vocab))
    start = len(hyps)
    for rs in refs:
        for g in set().union(*sentences[start : start + len(rs)]):
            df[vocab[g]] += 1
        start += len(rs)
    return np.array(sent_image), owner, ids, order, counts.astype(np.float64), df


def _ngram_entries(hyps: list[list[str]], refs: list[list[list[str]]]):
    """Flattened (sentence, n-gram id, order, count) entries and per-n-gram document frequency.

    Sentences are the hypotheses (index = image) followed by every reference. Words become
    ids 1..V and an n-gram the base-(V+1) number of its ids, so n-grams of different orders
    never collide; all counting is then done with numpy instead of per-n-gram Python dicts.
    """
    n_images = len(hyps)
    sentences = hyps + [r for rs in refs for r in rs]
    sent_image = np.concatenate(
        [np.arange(n_images), np.repeat(np.arange(n_images), [len(rs) for rs in refs])]
    ).astype(np.int64)
    vocab: dict[str, int] = {}
    tokens = np.array(
        [vocab.setdefault(w, len(vocab) + 1) for sent in sentences for w in sent], dtype=np.int64
    )
    base = len(vocab) + 1
    if base**N >= 2**62:
        return None  # vocabulary too large for exact integer n-gram keys
    lengths = np.array([len(sent) for sent in sentences], dtype=np.int64)
    sid = np.repeat(np.arange(len(sentences)), lengths)
    keys, owners = [], []
    for n in range(1, N + 1):
        valid = len(tokens) - n + 1
        if valid <= 0:
            break
        same = sid[:valid] == sid[n - 1 : n - 1 + valid]
        key = np.zeros(valid, dtype=np.int64)
        for k in range(n):
            key = key * base + tokens[k : k + valid]
        keys.append(key[same])
        owners.append(sid[:valid][same])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    ukeys, gram = np.unique(key, return_inverse=True)
    n_grams = len(ukeys)
    pair, counts = np.unique(owner * n_grams + gram, return_counts=True)
    owner_a, ids_a = pair // n_grams, pair % n_grams
    order_a = np.searchsorted(base ** np.arange(1, N), ukeys[ids_a], side="right")
    # Document frequency: number of images whose references contain the n-gram.
    is_ref = owner_a >= n_images
    image_gram = np.sort(sent_image[owner_a[is_ref]] * n_grams + ids_a[is_ref])
    # Sort-based distinct (numpy's hash-based np.unique is far slower here).
    image_gram = image_gram[np.concatenate([[True], image_gram[1:] != image_gram[:-1]])]
    df = np.bincount(image_gram % n_grams, minlength=n_grams).astype(np.float64)
    return sent_image, owner_a, ids_a, order_a, counts.astype(np.float64), df


def _entries(hyps: list[list[str]], refs: list[list[list[str]]]) -> tuple:
    """`_ngram_entries`, or `_ngram_entries_dict` for a vocabulary too large for it."""
    entries = _ngram_entries(hyps, refs)
    return entries if entries is not None else _ngram_entries_dict(hyps, refs)


def _cider_d(n_images: int, entries: tuple) -> np.ndarray:
    """Per-image CIDEr-D of `_entries`, vectorised over all (sentence, n-gram) entries."""
    sent_image, owner_a, ids_a, order_a, counts_a, df = entries
    n_sent = len(sent_image)
    ref_len = math.log(float(n_images))
    weight = counts_a * (ref_len - np.log(np.maximum(1.0, df[ids_a])))
    norm = np.sqrt(np.bincount(owner_a * N + order_a, weight**2, minlength=n_sent * N)).reshape(
        n_sent, N
    )
    # The toolkit's "length" is the number of bigrams.
    length = np.bincount(owner_a, counts_a * (order_a == 1), minlength=n_sent)
    image_a = np.asarray(sent_image)
    # Look each reference entry's n-gram up in its image's hypothesis.
    is_hyp = owner_a < n_images
    key = image_a[owner_a] * len(df) + ids_a
    # A sentinel key (-1) keeps the lookup valid when every hypothesis is empty.
    hyp_keys = np.concatenate([[-1], key[is_hyp]])
    hyp_w = np.concatenate([[0.0], weight[is_hyp]])
    order_sort = np.argsort(hyp_keys)
    hyp_keys, hyp_w = hyp_keys[order_sort], hyp_w[order_sort]
    ref_idx = np.nonzero(~is_hyp)[0]
    pos = np.minimum(np.searchsorted(hyp_keys, key[ref_idx]), len(hyp_keys) - 1)
    found = hyp_keys[pos] == key[ref_idx]
    w_ref = weight[ref_idx]
    contrib = np.where(found, np.minimum(hyp_w[pos], w_ref) * w_ref, 0.0)
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


def cider_d(hyps: list[str], refs: list[list[str]]) -> np.ndarray:
    """Per-image CIDEr-D of tokenised captions (document frequency from these references)."""
    return _cider_d(
        len(hyps), _entries([h.split() for h in hyps], [[r.split() for r in rs] for rs in refs])
    )


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
    entries = _entries(hyp_tokens, ref_tokens)
    bleu, bleu_per_image = _bleu(hyp_tokens, ref_tokens, entries)
    rouge = [_rouge_l(h, rs) for h, rs in zip(hyps, refs, strict=True)]
    cider = _cider_d(len(hyps), entries)
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
