"""GPU check of ``moba_core.varlen.CudnnVarlen``: cuDNN's fused attention for long causal sequences against
PyTorch's FlashAttention-2, at the 1B model's attention shape by default (32 query / 8 KV heads, D 64, bf16).

    python launch/cudnn_attention_check.py [--heads 32 --kv-heads 8 --head-dim 64] [--reps 10]
        [--batches 4096 3000+9000]

Prints one table: packed batch (document lengths), primitive, fwd ms, fwd+bwd ms, TFLOP/s (causal pairs x 4 D x
H_q x 3.5), the first call's seconds at that batch (cuDNN builds a plan per new length), and the largest
relative error of o / dq / dk / dv against the float64 dense reference (batches up to 8K tokens) or against
FlashAttention-2 (longer ones), and the largest difference of the LSE from FlashAttention-2's (the units MoBA's
merges rely on).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_core.varlen import CudnnVarlen, FlashVarlen  # noqa: E402
from train.bench_kernels import timed  # noqa: E402

BATCHES = ([4096], [8192], [16384], [3000, 9000, 500, 3884], [32768], [30000, 2768], [65536], [131072],
           [40000, 1000, 2000, 88072], [12288], [20000])  # 9000, 30000, 40000, 88072, 20000: padded for cuDNN


def reference(q, k, v, cu, scale):
    """float64 dense causal attention per document."""
    g = q.shape[1] // k.shape[1]
    out = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        sc = qs @ ks.transpose(1, 2) * scale
        sc = sc.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out.append((sc.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


def check_batch(lens, prims, Hq, Hkv, D, reps):
    """Prints one row per primitive for the packed batch of documents ``lens``."""
    T, m, scale = sum(lens), max(lens), 1 / math.sqrt(D)
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    flops = 3.5 * 4 * sum(n * (n + 1) / 2 for n in lens) * D * Hq
    ref = None
    if T <= 8192:
        qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
        o64 = reference(qd, kd, vd, cu, scale)
        ref = [o64.detach(), *torch.autograd.grad(o64, (qd, kd, vd), do.double())]
    got = {}
    for name, p in prims.items():
        def fwd(p=p):
            return p.fwd(q, k, v, cu, cu, m, m, True, scale)

        def fb(p=p):
            o, lse = p.fwd(q, k, v, cu, cu, m, m, True, scale)
            return [o, *p.bwd(do, q, k, v, o, lse, cu, cu, m, m, True, scale), lse]

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        got[name] = fb()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t_fwd, t_fb = timed(fwd, reps), timed(fb, reps)
        base = ref if ref is not None else [x.double() for x in got["flash"][:4]]
        errs = [((x.double() - r).norm() / r.norm()).item() for x, r in zip(got[name], base)]
        err = " / ".join(f"{e:.1e}" for e in errs) + ("" if ref is not None else " (vs flash)")
        lse_diff = (got[name][4] - got["flash"][4]).abs().max().item()  # LSE units: MoBA merges by them
        print(f"| {'+'.join(map(str, lens))} | {name}{' (fell back)' if getattr(p, 'failed', False) else ''} "
              f"| {t_fwd:.2f} | {t_fb:.2f} | {flops / t_fb / 1e9:.0f} | {first:.2f} | {err} | {lse_diff:.1e} |",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--min-seqlen", type=int, default=4096)
    ap.add_argument("--batches", nargs="*", help="packed batches as document lengths joined by '+'")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: launch/cudnn_attention_check.py needs a CUDA device", file=sys.stderr)
        return 2
    batches = [[int(n) for n in b.split("+")] for b in a.batches] if a.batches else BATCHES
    prims = {"flash": FlashVarlen(), "cudnn": CudnnVarlen(min_seqlen=a.min_seqlen)}
    print(f"H_q {a.heads}, H_kv {a.kv_heads}, D {a.head_dim}, bf16, {torch.cuda.get_device_name()}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    print("| documents | primitive | fwd ms | fwd+bwd ms | TFLOP/s | first call s | rel. err o / dq / dk / dv | "
          "max abs LSE diff vs flash |")
    print("|---|---|---|---|---|---|---|---|")
    for lens in batches:
        check_batch(lens, prims, a.heads, a.kv_heads, a.head_dim, a.reps)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
