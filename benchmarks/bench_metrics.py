"""Speed of vlp.metrics against the MS-COCO toolkit's Python scorers and a plain VSE++ loop.

Run: .venv/bin/python benchmarks/bench_metrics.py [--images 5000] [--texts-per-image 5] [--only captions]
Needs the `bench` extra (pycocoevalcap) for the caption comparison; no Java is used: both
sides get the same already-tokenised captions.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from vlp.metrics.caption import cider_d, score_tokenized
from vlp.metrics.retrieval import recall_at_k

WORDS = (
    "a an the man woman dog cat red blue green car bus train sitting standing on in near "
    "with of large small white black field street table plate pizza two three people "
    "riding holding looking next to front building water grass snow kitchen room"
).split()


def synthetic_captions(
    n_images: int, n_refs: int, seed: int = 0
) -> tuple[list[str], list[list[str]]]:
    """Deterministic tokenised captions of 6-16 words, references sharing words with the hypothesis."""
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=rng.integers(6, 17)))

    return [sentence() for _ in range(n_images)], [
        [sentence() for _ in range(n_refs)] for _ in range(n_images)
    ]


def timed(fn, *args):
    """(result, seconds) of one call."""
    out, seconds, _ = timed_cpu(fn, *args)
    return out, seconds


def timed_cpu(fn, *args):
    """(result, wall seconds, CPU seconds of this process) of one call: on a busy machine the
    CPU seconds are the steadier measure."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - start, time.process_time() - start_cpu


def bench_captions(n_images: int, n_refs: int) -> None:
    """Ours vs pycocoevalcap Bleu/Rouge/Cider on the same tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = synthetic_captions(n_images, n_refs)
    gts = {i: refs[i] for i in range(n_images)}
    res = {i: [hyps[i]] for i in range(n_images)}
    (ref_bleu, _), t_bleu, c_bleu = timed_cpu(lambda: Bleu(4).compute_score(gts, res, verbose=0))
    (ref_rouge, _), t_rouge, c_rouge = timed_cpu(lambda: Rouge().compute_score(gts, res))
    (ref_cider, _), t_cider, c_cider = timed_cpu(lambda: Cider().compute_score(gts, res))
    ours, t_ours, c_ours = timed_cpu(score_tokenized, hyps, refs)
    our_cider, t_our_cider, c_our_cider = timed_cpu(cider_d, hyps, refs)
    reference = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], ref_bleu, strict=True))
    reference.update(ROUGE_L=ref_rouge, CIDEr=ref_cider)
    print(f"captions: {n_images} images x {n_refs} references (tokenised, no Java)")
    for key, value in reference.items():
        print(
            f"  {key:8s} ours {ours[key]:.12f}  toolkit {value:.12f}  |diff| {abs(ours[key] - value):.1e}"
        )
    total_ref, total_cpu = t_bleu + t_rouge + t_cider, c_bleu + c_rouge + c_cider
    for name, ours_s, ref_s, ours_c, ref_c in (
        ("CIDEr-D", t_our_cider, t_cider, c_our_cider, c_cider),
        ("all 6", t_ours, total_ref, c_ours, total_cpu),
    ):
        print(
            f"  {name:8s} ours {ours_s:7.2f} s  toolkit {ref_s:7.2f} s  speed-up "
            f"{ref_s / ours_s:5.1f}x  (CPU: ours {ours_c:.2f} s, toolkit {ref_c:.2f} s, "
            f"{ref_c / ours_c:5.1f}x)"
        )
    print(f"  (toolkit: BLEU {t_bleu:.2f} s, ROUGE-L {t_rouge:.2f} s, CIDEr-D {t_cider:.2f} s)")


def vse_loop(sims: np.ndarray, per_image: int) -> dict[str, float]:
    """The VSE++ evaluation loop (argsort per query), the usual reference implementation."""
    n = sims.shape[0]
    i2t = np.empty(n)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == k)[0][0] for k in range(per_image * i, per_image * (i + 1)))
    t2i = np.empty(n * per_image)
    for j in range(n * per_image):
        order = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(order == j // per_image)[0][0]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    return out


def peak_mib(fn, *args):
    """(result, seconds, peak MiB allocated during the call) of one call."""
    tracemalloc.start()
    out, seconds = timed(fn, *args)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def bench_retrieval(n_images: int, per_image: int) -> None:
    """Ours vs the VSE++ loop on a random float32 similarity matrix."""
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((n_images, n_images * per_image), dtype=np.float32)
    sims += 3 * np.repeat(np.eye(n_images, dtype=np.float32), per_image, axis=1)
    ours, t_ours, m_ours = peak_mib(recall_at_k, sims)
    ref, t_ref, m_ref = peak_mib(vse_loop, sims, per_image)
    print(
        f"retrieval: {n_images} images x {n_images * per_image} texts, similarity {sims.nbytes / 2**20:.0f} MiB float32"
    )
    print(
        "  equal values:",
        all(abs(ours[k] - ref[k]) < 1e-9 for k in ref),
        {k: round(v, 3) for k, v in ours.items()},
    )
    print(f"  ours {t_ours:7.2f} s, peak extra {m_ours:6.0f} MiB")
    print(
        f"  VSE++ loop {t_ref:7.2f} s, peak extra {m_ref:6.0f} MiB  speed-up {t_ref / t_ours:5.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--texts-per-image", type=int, default=5)
    parser.add_argument("--only", choices=("captions", "retrieval"), default=None)
    args = parser.parse_args()
    if args.only != "retrieval":
        bench_captions(args.images, args.texts_per_image)
    if args.only != "captions":
        bench_retrieval(args.images, args.texts_per_image)


if __name__ == "__main__":
    main()
