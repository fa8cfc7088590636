"""GPU: where the host time of a short MoBA call goes, against the GPU time of the same work.

    python launch/host_profile.py [--point 8192:512:3] [--reps 200] [--top 25]

At short points (8192:512:3: ~1.5 ms of kernels per fwd+bwd) the back-to-back time of ``moba_attention`` can be
set by the host's work per call rather than the GPU's. For one point (16 heads, head dim 128, bf16, as
``train.bench_kernels``) this prints, per call and for the forward alone (no grad) and fwd+bwd:

* ``eager``: CUDA-event time of ``--reps`` calls issued back to back, divided by ``--reps``;
* ``host``: wall time of issuing those calls (the host's share; it bounds ``eager`` from below);
* ``graph``: the same call captured once in a CUDA graph (``torch.cuda.graph``) and replayed back to back: the
  GPU time with no host work between kernels, i.e. what the call costs when the host keeps up;

then a cProfile of ``--reps`` eager fwd+bwd calls (functions sorted by own time, ``--top`` rows): which Python
code, launcher or dispatcher the host time is spent in. Needs a CUDA device (exit status 2 without one).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.launch import STATS as launch_stats  # noqa: E402
from kernels.launch import fast_launch_enabled  # noqa: E402
from moba_core import moba_attention  # noqa: E402
from train.bench_kernels import parse_point  # noqa: E402

HEADS, HEAD_DIM = 16, 128


def per_call(fn, reps: int) -> tuple[float, float]:
    """(GPU ms, host ms) per call of ``fn`` issued ``reps`` times back to back, after 10 untimed calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    h0 = time.perf_counter()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    host = (time.perf_counter() - h0) * 1e3 / reps
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps, host


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as ``torch.cuda.graph`` asks); returns
    the graph's ``replay``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--point", default="8192:512:3", help="[NSEQx]SEQ_LEN:BLOCK:TOP_K")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--top", type=int, default=25, help="rows of the cProfile table (0: no profile)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: launch/host_profile.py needs a CUDA device", file=sys.stderr)
        return 2
    nseq, L, bs, top_k = parse_point(args.point)
    T = nseq * L
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")

    def fwd():
        with torch.no_grad():
            return moba_attention(q, k, v, cu, L, bs, top_k, backend="triton")

    def fwd_bwd():
        moba_attention(q, k, v, cu, L, bs, top_k, backend="triton").backward(do)

    def full_fwd_bwd():
        qs, ks, vs = (x.unflatten(0, (nseq, L)).transpose(1, 2) for x in (q, k, v))
        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(
            do.unflatten(0, (nseq, L)).transpose(1, 2))

    print(f"point {args.point}: {HEADS} heads, head dim {HEAD_DIM}, bf16, {args.reps} calls back to back")
    print("| call | eager ms | host ms | graph ms |")
    print("|---|---|---|---|")
    for name, fn in (("moba fwd (no grad)", fwd), ("moba fwd+bwd", fwd_bwd), ("full (SDPA) fwd+bwd", full_fwd_bwd)):
        eager, host = per_call(fn, args.reps)
        try:
            replay = f"{per_call(graphed(fn), args.reps)[0]:.3f}"
        except RuntimeError as err:  # a capture that fails (a host sync, an unsupported op) names the reason
            replay = f"n/a ({str(err).splitlines()[0][:80]})"
        print(f"| {name} | {eager:.3f} | {host:.3f} | {replay} |", flush=True)
    if fast_launch_enabled():  # a direct path that never hits would time like Triton's own: count the hits
        print(f"MOBA_FAST_LAUNCH=1: launches since import: {launch_stats['direct']} direct, "
              f"{launch_stats['triton']} through Triton's path")
    if args.top == 0:
        return 0
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(args.reps):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"cProfile of {args.reps} eager fwd+bwd calls (own time):")
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
