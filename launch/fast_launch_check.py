"""GPU check of ``MOBA_FAST_LAUNCH=1`` (``kernels/launch.py``): the same outputs as Triton's own launch path, and
the fwd+bwd time (CUDA events) and host time per call of both, at short points where the host bounds the time.

    python launch/fast_launch_check.py [--points 8192:512:3 8192:128:8 ...] [--reps 30]

Prints a table: point, fast launch off / on, fwd+bwd ms, host ms (median), and for "on" the launches per
call that went direct and through Triton's path (``kernels.launch.STATS``) and the largest absolute difference
from "off" in o, dq, dk, dv (bf16; dQ of blocks up to 256 keys is summed with atomics,
so it may differ in its last bits).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import launch as launch_stats  # noqa: E402
from moba_core import moba_attention  # noqa: E402
from train.bench_kernels import parse_point  # noqa: E402

HEADS, HEAD_DIM = 16, 128


def run(nseq: int, L: int, bs: int, top_k: int, fast: str, reps: int):
    """(median fwd+bwd ms, median host ms, [o, dq, dk, dv] of one call, (direct, Triton-path) launches per call)
    with MOBA_FAST_LAUNCH=fast."""
    os.environ["MOBA_FAST_LAUNCH"] = fast
    g = torch.Generator(device="cuda").manual_seed(0)
    T = nseq * L
    q, k, v = (torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")

    def fb():
        o = moba_attention(q, k, v, cu, L, bs, top_k, backend="triton")
        o.backward(do)
        return o

    for _ in range(3):
        fb()
    q.grad = k.grad = v.grad = None
    out = [fb().detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    torch.cuda.synchronize()
    before = dict(launch_stats.STATS)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        a.record()
        fb()
        b.record()
        h1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((a.elapsed_time(b), (h1 - h0) * 1e3))
    mid = len(times) // 2
    per_call = tuple((launch_stats.STATS[k] - before[k]) / reps for k in ("direct", "triton"))
    return sorted(t[0] for t in times)[mid], sorted(t[1] for t in times)[mid], out, per_call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["8192:512:3", "8192:128:8", "32768:2048:3", "2x32768:128:8"])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    print("| point | fast launch | fwd+bwd ms | host ms | direct / Triton launches per call | "
          "max abs diff vs off (o, dq, dk, dv) |")
    print("|---|---|---|---|---|---|")
    for text in args.points:
        nseq, L, bs, top_k = parse_point(text)
        off = run(nseq, L, bs, top_k, "0", args.reps)
        on = run(nseq, L, bs, top_k, "1", args.reps)
        diff = ", ".join(f"{float((a.float() - b.float()).abs().max()):.1e}" for a, b in zip(off[2], on[2]))
        print(f"| {text} | off | {off[0]:.2f} | {off[1]:.2f} | | |")
        print(f"| {text} | on | {on[0]:.2f} | {on[1]:.2f} | {on[3][0]:.0f} / {on[3][1]:.0f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
