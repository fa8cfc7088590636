"""GPU: time each MoBA Triton kernel alone and sweep its launch configuration (the table behind
``kernels.config.kernel_config``): python launch/tune_kernels.py [--points ...] [--out FILE].

For every point and kernel, the other kernels of the same pass are replaced by no-ops, so a row is the
time of that kernel alone (median of a few runs, bf16; 16 heads at D=128 unless ``--heads HQ:HKV`` and
``--head-dim`` say otherwise, e.g. ``--heads 32:8 --head-dim 64`` for the 1B training shape). Configs are
set through the ``MOBA_CFG_<NAME>=BM,BN,WARPS,STAGES`` overrides that ``kernel_config`` reads on every call.
"""

# ruff: noqa: B023 - the timed lambdas capture loop variables on purpose: each runs only in its iteration
import argparse
import json
import os
import sys

import torch

import kernels.attention_bwd as bwd
import kernels.attention_fwd as fwd
import kernels.routing as routing
from kernels.config import kernel_config
from moba_core import triton_backend as tb
from train.bench_kernels import parse_point, timed

SWEEP = {
    "list_fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4),
                 (128, 128, 8, 2), (128, 128, 8, 4)],
    "combine_fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3),
                    (64, 64, 8, 3), (32, 64, 4, 3)],
    "dkdv": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (32, 128, 8, 3),
             (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (16, 128, 8, 3), (64, 64, 8, 3)],
    "dkdv_fused": [(32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (16, 128, 4, 2),
                   (64, 128, 8, 3), (32, 128, 4, 2)],
    "list_dq": [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                (128, 32, 4, 4), (128, 32, 8, 3), (128, 64, 8, 4)],
    "diag_dq": [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3),
                (128, 32, 8, 3)],
    "route": [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
              (32, 64, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 2, 2)],
}
# the kernel each entry times; the fused / split dQ choice it needs (MOBA_FUSED_DQ)
KERNEL_FN = {"list_fwd": (fwd, "_list_fwd_kernel"), "combine_fwd": (fwd, "_combine_fwd_kernel"),
             "dkdv": (bwd, "_dkdv_kernel"), "dkdv_fused": (bwd, "_dkdv_kernel"), "list_dq": (bwd, "_list_dq_kernel"),
             "diag_dq": (bwd, "_diag_dq_kernel"), "route": (routing, "_route_topk_kernel")}
FUSED = {"dkdv": "0", "dkdv_fused": "1", "list_dq": "0", "diag_dq": "0"}


class _NoOp:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def only(name):
    """Context: every kernel of ``KERNEL_FN`` except ``name`` becomes a no-op."""
    saved = {}
    for mod, attr in set(KERNEL_FN.values()):
        if (mod, attr) != KERNEL_FN[name]:
            saved[(mod, attr)] = getattr(mod, attr)
            setattr(mod, attr, _NoOp())
    return saved


def restore(saved):
    for (mod, attr), fn in saved.items():
        setattr(mod, attr, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", nargs="+", default=["131072:4096:12", "32768:2048:3", "131072:512:8", "8192:512:3"])
    ap.add_argument("--kernels", default=",".join(SWEEP))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--heads", default="16:16", help="query heads:KV heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default="tune.json")
    args = ap.parse_args()
    HQ, HKV = (int(x) for x in args.heads.split(":"))
    D = args.head_dim
    shape = f"{HQ}:{HKV}xD{D}"
    rows = []
    for p in args.points:
        nseq, L, bs, top_k = parse_point(p)
        T = nseq * L
        torch.manual_seed(0)
        q, do = (torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = [L] * nseq
        scale = D ** -0.5
        for name in args.kernels.split(","):
            for cfg in SWEEP[name]:
                os.environ[f"MOBA_CFG_{name.upper()}"] = ",".join(map(str, cfg))
                os.environ["MOBA_FUSED_DQ"] = FUSED.get(name, "1")
                try:
                    with torch.no_grad():
                        o, lse, layout, sel, lists, dense_blocks, budget, _ = tb._moba_forward(
                            q, k, v, lens, bs, top_k, scale, False)
                    saved = only(name)
                    try:
                        if name == "route":
                            means = routing.block_means(k, layout)
                            fn = lambda: routing.route_topk(q, means, layout, top_k, bs, False)  # noqa: E731
                        elif name in ("list_fwd", "combine_fwd"):
                            fn = lambda: fwd.moba_fwd(q, k, v, layout, sel, lists, top_k, bs, scale, False, o, budget)  # noqa: E731
                        else:
                            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                            fn = lambda: bwd.moba_bwd(do, q, k, v, o, lse, layout, sel, lists, top_k, bs, scale,  # noqa: E731
                                                      False, dense_blocks, dq, dk, dv, budget)
                        ms = timed(fn, args.reps)
                    finally:
                        restore(saved)
                except Exception as e:  # noqa: BLE001 - a failing config is a row, not the end of the sweep
                    ms = f"err {type(e).__name__}: {str(e)[:80]}"
                rows.append(dict(point=p, shape=shape, kernel=name, cfg=cfg, ms=ms))
                cell = ms if isinstance(ms, str) else f"{ms:8.2f}"
                print(f"{p:16s} {shape} {name:12s} {str(cfg):18s} {cell}", flush=True)
            os.environ.pop(f"MOBA_CFG_{name.upper()}", None)
            os.environ.pop("MOBA_FUSED_DQ", None)
        with torch.no_grad():
            layout = tb.cached_layout(tuple(lens), bs, top_k, q.device)
            means = routing.block_means(k, layout)
            sel = routing.route_topk(q, means, layout, top_k, bs, False)
            tile_m = kernel_config("list_fwd", bs, D, q.dtype)["BLOCK_M"]
            parts = {"routing": lambda: tb.moba_routing(q, k, lens, bs, top_k, False, top_k),
                     "routing.means": lambda: routing.block_means(k, layout),
                     "routing.topk": lambda: routing.route_topk(q, means, layout, top_k, bs, False),
                     "routing.lists": lambda: routing.build_block_lists(sel, layout["NB"], tile_m)}
            for name, fn in parts.items():
                ms = timed(fn, args.reps)
                print(f"{p:16s} {name} {ms:.2f} ms", flush=True)
                rows.append(dict(point=p, shape=shape, kernel=name, cfg=None, ms=ms))
    json.dump(rows, open(args.out, "w"), indent=1)
    best = {}
    for r in rows:
        if isinstance(r["ms"], float):
            key = (r["point"], r["kernel"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    for (p, kname), r in best.items():
        print(f"BEST {p:16s} {shape} {kname:12s} {r['cfg']} {r['ms']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
