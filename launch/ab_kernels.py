"""GPU: A/B of the MoBA kernels between two copies of the code, one process per copy:

    git archive main moba_core kernels | tar x -C /tmp/old     # the code to compare against
    python launch/ab_kernels.py /tmp/old --tag old --out old.json
    python launch/ab_kernels.py .        --tag new --out new.json
    python launch/ab_kernels.py --table old.json new.json       # per-part ratios new / old

ROOT goes first on ``sys.path``, so ``moba_core`` and ``kernels`` come from it (the timing helpers from this
checkout). Per shape (``--shapes HQ:HKV:D``) and point (``T:block:top_k``) it times, bf16: the no-grad forward
(``fwd``, routing included), the routing alone (``route``), its scores + top-k kernel alone (``topk``), the
list kernel alone (``list``) and the combine kernel alone (``combine``), the other kernel of the forward replaced
by a no-op (``launch/tune_kernels.py``'s method); with ``--backward`` also the backward given the forward
(``bwd``) and its dK/dV and list dQ kernels alone (``dkdv``, ``list_dq``; the gather and delta kernels run in
both). Run the two copies in A B B A order in one session: the H200's clock follows its power draw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def time_point(HQ: int, HKV: int, D: int, point: str, reps: int, backward: bool) -> dict:
    """Median ms of each forward part at one shape and point (the modules of ROOT, see ``run``)."""
    import torch
    from tune_kernels import only, restore

    import kernels.attention_bwd as bwd
    import kernels.attention_fwd as fwd
    import kernels.routing as routing
    from moba_core import triton_backend as tb
    from train.bench_kernels import parse_point, timed

    nseq, L, bs, top_k = parse_point(point)
    T = nseq * L
    torch.manual_seed(0)
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = [L] * nseq
    scale = D ** -0.5
    with torch.no_grad():
        o, lse, layout, sel, lists, dense_blocks, budget, _ = tb._moba_forward(q, k, v, lens, bs, top_k, scale, False)
        res = {"fwd": timed(lambda: tb._moba_forward(q, k, v, lens, bs, top_k, scale, False), reps),
               "route": timed(lambda: tb.moba_routing(q, k, lens, bs, top_k, False, top_k), reps)}
        means = routing.block_means(k, layout)
        res["topk"] = timed(lambda: routing.route_topk(q, means, layout, top_k, bs, False), reps)
        for name, kname in (("list", "list_fwd"), ("combine", "combine_fwd")):
            saved = only(kname)
            try:
                res[name] = timed(lambda: fwd.moba_fwd(q, k, v, layout, sel, lists, top_k, bs, scale, False, o, budget),
                                  reps)
            finally:
                restore(saved)
        if backward:
            do = torch.randn_like(q)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

            def kernel_bwd():
                bwd.moba_bwd(do, q, k, v, o, lse, layout, sel, lists, top_k, bs, scale, False, dense_blocks, dq, dk,
                             dv, budget)

            res["bwd"] = timed(kernel_bwd, reps)
            fused = "dkdv_fused" if bwd.fused_dq(bs) else "dkdv"
            for name, kname in (("dkdv", fused), ("list_dq", "list_dq")):
                if kname == "list_dq" and fused == "dkdv_fused":
                    continue  # dQ inside the dK/dV kernel
                saved = only(kname)
                try:
                    res[name] = timed(kernel_bwd, reps)
                finally:
                    restore(saved)
    return res


def run(root: str, tag: str, shapes: list[str], points: list[str], reps: int, backward: bool) -> list[dict]:
    """Rows (tag, shape, point, part, ms) with ``moba_core`` and ``kernels`` imported from ``root``."""
    sys.path.insert(0, os.path.abspath(root))
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # tune_kernels
    import torch

    rows = []
    for shape in shapes:
        HQ, HKV, D = (int(x) for x in shape.split(":"))
        for p in points:
            for name, ms in time_point(HQ, HKV, D, p, reps, backward).items():
                rows.append(dict(tag=tag, shape=shape, point=p, part=name, ms=ms))
                print(f"{tag:6s} {shape:10s} {p:16s} {name:8s} {ms:8.3f} ms", flush=True)
            torch.cuda.empty_cache()
    return rows


def table(paths: list[str]) -> str:
    """Per (shape, point, part): the median ms of each tag over its files, and the ratio of the last tag to the
    first."""
    import statistics

    ms: dict = {}
    tags: list[str] = []
    for path in paths:
        for r in json.load(open(path)):
            ms.setdefault((r["shape"], r["point"], r["part"]), {}).setdefault(r["tag"], []).append(r["ms"])
            if r["tag"] not in tags:
                tags.append(r["tag"])
    lines = [f"| shape | point | part | {' | '.join(tags)} | {tags[-1]} / {tags[0]} |",
             "|---|---|---|" + "---|" * (len(tags) + 1)]
    for (shape, point, part), by in ms.items():
        med = [statistics.median(by[t]) if t in by else float("nan") for t in tags]
        lines.append(f"| {shape} | {point} | {part} | " + " | ".join(f"{m:.3f}" for m in med)
                     + f" | {med[-1] / med[0]:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", help="checkout whose moba_core / kernels are timed")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--shapes", nargs="+", default=["32:8:64", "16:16:128"], help="HQ:HKV:D")
    ap.add_argument("--points", nargs="+", default=["131072:512:8", "32768:2048:3"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="also the backward (bwd) and its dK/dV and list dQ "
                    "kernels alone (dkdv, list_dq; gather and delta kernels included in each)")
    ap.add_argument("--out", default=None, help="JSON rows")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the comparison of earlier runs and exit")
    args = ap.parse_args(argv)
    if args.table:
        missing = [p for p in args.table if not os.path.isfile(p)]
        if missing:
            ap.error(f"--table: no file {missing[0]}")
        print(table(args.table))
        return 0
    if not args.root:
        ap.error("give ROOT (a checkout) or --table JSON...")
    if not os.path.isdir(os.path.join(args.root, "kernels")):
        ap.error(f"ROOT {args.root!r} holds no kernels/ directory")
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (it times the Triton kernels)")
    rows = run(args.root, args.tag, args.shapes, args.points, args.reps, args.backward)
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
