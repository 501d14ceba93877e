"""Logit memory of one rank's ITC loss: its own rows (local loss) vs the whole world matrix.

For world size W and per-rank batch B (world batch N = W * B), one rank's ITC loss is run
forward and backward on CPU as `vlp.models.objectives` computes it: with `local_loss` the
[B, N] logits of its rows in both directions, without it the [N, N] matrix. The other
ranks' features are random tensors standing in for the all_gather's output (gradients flow
into them as through the gather). Each size runs in a fresh process; the table gives the
logit elements per rank (analytic) and the peak resident memory the loss added (measured):

    python benchmarks/bench_local_loss.py [--batch 128] [--worlds 1 2 4 8 16 32] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from vlp.models.objectives import itc_loss


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(local: bool, world: int, batch: int, dim: int) -> dict[str, float]:
    """Peak MiB the loss's forward + backward adds on this rank (run in a fresh process)."""
    torch.manual_seed(0)
    n = world * batch
    image_all = torch.nn.functional.normalize(torch.randn(n, dim), dim=1).requires_grad_()
    text_all = torch.nn.functional.normalize(torch.randn(n, dim), dim=1).requires_grad_()
    ids_all = torch.arange(n)
    temp = torch.tensor(0.07, requires_grad=True)
    before = _rss_kib()
    if local:  # rank 0's rows against the world's columns
        image, text, ids = image_all[:batch], text_all[:batch], ids_all[:batch]
        pos = ids.unsqueeze(1) == ids_all.unsqueeze(0)
        loss = itc_loss(image @ text_all.t() / temp, text @ image_all.t() / temp, pos)
    else:
        sim = image_all @ text_all.t() / temp
        loss = itc_loss(sim, sim.t(), ids_all.unsqueeze(1) == ids_all.unsqueeze(0))
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": max(peak - before, 0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch B")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--dim", type=int, default=256, help="ITC embedding width")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "WORLD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, world, batch = args.one
        print(json.dumps(measure(mode == "local", int(world), int(batch), args.dim)))
        return

    print(f"B = {args.batch} per rank, embedding width {args.dim}, fp32, forward + backward\n")
    print(
        "| world W | world batch N | local logits 2BN | global logits N^2 | ratio "
        "| local peak MiB | global peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for world in args.worlds:
        n = world * args.batch
        peaks = {}
        for mode in ("local", "global"):
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--one", mode]
            out = subprocess.run(
                [*cmd, str(world), str(args.batch)], capture_output=True, text=True, check=True
            )
            peaks[mode] = json.loads(out.stdout)["peak_mib"]
        local_el, global_el = 2 * args.batch * n, n * n
        print(
            f"| {world} | {n} | {local_el:,} ({local_el * 4 / 2**20:.1f} MiB) "
            f"| {global_el:,} ({global_el * 4 / 2**20:.1f} MiB) | {global_el / local_el:.1f}x "
            f"| {peaks['local']:.1f} | {peaks['global']:.1f} |"
        )


if __name__ == "__main__":
    main()
