"""MoBA kernel benchmark (GPU): ``python -m train.bench_kernels [--points ...] [--methods ...] [--reps N]``.

Drives the public ``moba_core`` API. bf16, 16 heads, head dim 128, one or more sequences per point. Side
by side per point, in one process: full causal attention (PyTorch SDPA, the dense ceiling), MoBA as a
FlexAttention block mask (``flex``), our ``flash`` backend and our ``triton`` backend. Columns: fwd ms,
fwd+bwd ms, speed-up over full (fwd / fwd+bwd), ideal speed-up (causal key positions / key positions MoBA
attends), first call (seconds of the first fwd+bwd at the point: compilation included, with a fresh Triton
cache per run), peak memory (GiB, inputs and gradients included, and its ratio to full attention's), and
for the triton backend the split routing / forward / backward (ms). Full attention at 1M tokens is not
run: its time is estimated as 4x the 512K time and its memory as 2x (marked "est.").

``--cold`` runs only each point's first fwd+bwd of the ``triton`` backend, each in a new process with an empty Triton
cache (``cold_first_calls``): what a first step costs on a machine that never compiled the kernels.

Output: the table printed and written into ``BENCHMARKS.md`` between marker comments, and every row into
``results/kernels.json`` (a list of objects with ``point``, ``method``, ``fwd_ms``, ``fwdbwd_ms``,
``first_call_s``, ``peak_gib``, ``gpu``, ``date`` and extras), both replaced on each run.

FlexAttention formulation: routing is computed by our Triton routing kernel (``route_topk``; not
counted in Flex's time), then per (sequence, head, 128-query tile) the union of the MoBA blocks chosen by
the tile's queries plus the tile's own block is expanded to 128-key tiles, giving ``kv_num_blocks`` /
``kv_indices`` for ``BlockMask.from_kv_blocks``; the ``mask_mod`` keeps exactly a query's own block
(causal) and its selected blocks (a lookup into the (B, H, L, k-1) selection). All tiles are "partial"
(the mask_mod runs everywhere), which is what a user writing MoBA with Flex gets. Flex is skipped above
128K tokens (its block-mask tensors grow as L^2 / 128^2 per head).

Points ``[nseq x ]seq_len:block:top_k``; an ``OOM`` / ``err`` cell means that call raised.
"""

from __future__ import annotations

# ruff: noqa: B023 - the per-point lambdas capture loop variables on purpose: each runs only in its iteration
import argparse
import datetime
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from moba_core.graphs import GRAPHS

from .bench import replace_marked_section, shown_command

DEFAULT_POINTS = ["8192:4096:12", "8192:512:3", "32768:2048:3", "131072:4096:12", "131072:512:8",
                  "524288:4096:12", "1048576:4096:12", "2x32768:128:8", "2x65536:128:8", "2x131072:128:8"]
METHODS = ("full", "flex", "flash", "triton")
H, D = 16, 128
MARK_START, MARK_END = "<!-- kernels-bench:start -->", "<!-- kernels-bench:end -->"
GRAD = [None]


def parse_point(p: str):
    m = re.fullmatch(r"(?:(\d+)x)?(\d+):(\d+):(\d+)", p)
    if not m:
        raise ValueError(f"point {p!r} must look like [NSEQ x]SEQ_LEN:BLOCK:TOP_K")
    return int(m.group(1) or 1), int(m.group(2)), int(m.group(3)), int(m.group(4))


def attended_positions(L: int, bs: int, top_k: int) -> int:
    """Key positions MoBA attends for one sequence of L tokens (sum over queries)."""
    total = 0
    for b in range(math.ceil(L / bs)):
        n = min(bs, L - b * bs)
        total += n * (n + 1) // 2 + n * min(top_k - 1, b) * bs
    return total


MIN_TIMED_MS = 200.0  # short calls repeat until this much was timed: a median of 3 runs of 2 ms moves by ~5%
MAX_TIMED_MS = 3000.0  # a method stops adding runs once this much was timed (long points: a few runs)
SETTLE_MS = 100.0  # untimed calls of a method before its timed runs: the clock settles to its own power draw


def cuda_times(fn, n: int) -> list[float]:
    """Milliseconds of GPU time of each of ``n`` back-to-back calls of ``fn`` (CUDA events between the calls, one
    synchronisation after the last), after one untimed call. The host queues call i + 1 while the GPU runs
    call i, as in a training loop, so a call's time is its GPU time unless the host cannot keep up (then the
    host's time per call shows): the time to the first kernel of an idle GPU is left out
    (``triton.testing.do_bench`` times the same way)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    fn()  # untimed: the GPU is busy with it while the host queues the first timed call
    events[0].record()
    for e in events[1:]:
        fn()
        e.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]


def timed_many(fns: dict, reps: int, clock=cuda_times) -> dict:
    """Median milliseconds of each callable of ``fns`` (name -> fn), each timed in its own steady state: two
    blocks per method, the methods in order and then in reverse (A B B A), so that a slow drift of the GPU
    during the measurement reaches every method alike. Each block starts with untimed warm-up calls of at
    least ``SETTLE_MS`` of that method's own work (at least one call, at most 500): the H200 holds its 700 W cap under
    long full-attention calls by lowering its clock (1980 -> ~1450-1550 MHz, ``nvidia-smi dmon``), and a
    method timed right after another inherits that clock for a while (MoBA's 131072:512:8 forward measured
    21.1 ms alone and 26.7 ms in rounds alternating one call of each method, session 9). A block then times
    back-to-back calls until it has at least ``ceil(reps / 2)`` of them and at least ``MIN_TIMED_MS / 2`` of
    timed work (at most 500 calls), or ``MAX_TIMED_MS / 2`` timed; the number of calls of each batch comes from
    the last batch's median. A method whose call raises leaves with the cell ``"OOM"`` (out of memory) or
    ``"err"`` (traceback printed); the others go on. ``clock(fn, n) -> [ms] * n`` times ``n`` back-to-back calls
    (``cuda_times``; tests pass another)."""
    out, times = {}, {n: [] for n in fns}

    def block(name, fn):
        t = []
        try:
            last = clock(fn, 1)  # the first call also gives the size of the next batches
            settle, calls = sum(last), 1
            while settle < SETTLE_MS and calls < 500:
                last = clock(fn, min(500 - calls, math.ceil((SETTLE_MS - settle) / max(statistics.median(last), 1e-3))))
                settle, calls = settle + sum(last), calls + len(last)
            while not (sum(t) >= MAX_TIMED_MS / 2
                       or (len(t) >= -(-reps // 2) and (sum(t) >= MIN_TIMED_MS / 2 or len(t) >= 500))):
                per_call = max(statistics.median(last), 1e-3)
                n = max(-(-reps // 2) - len(t), math.ceil((MIN_TIMED_MS / 2 - sum(t)) / per_call), 1)
                n = max(1, min(n, 500 - len(t), int((MAX_TIMED_MS / 2 - sum(t)) / per_call)))
                last = clock(fn, n)
                t += last
        except torch.OutOfMemoryError:
            out[name] = "OOM"
        except Exception:  # noqa: BLE001 - a failing cell must not stop the table
            traceback.print_exc(limit=3)
            out[name] = "err"
        times[name] += t

    names = list(fns)
    for name in names + names[::-1]:
        if name not in out:
            block(name, fns[name])
    for name in names:
        if name not in out:
            t = sorted(times[name])
            out[name] = t[len(t) // 2]
    return {n: out[n] for n in names}


def timed(fn, reps: int, clock=cuda_times) -> float:
    """Median milliseconds of one callable (``timed_many`` with one method).

    Raises:
        RuntimeError: the call failed (its traceback is printed).
    """
    ms = timed_many({"fn": fn}, reps, clock)["fn"]
    if isinstance(ms, str):
        raise RuntimeError(f"the timed call failed ({ms})")
    return ms


def measure(fwd):
    """First-call seconds and peak GiB of one fwd+bwd of ``fwd() -> output with requires_grad``, and the fwd+bwd
    callable to time (``timed_many``); 'OOM' / 'err' cells when the first call raised."""
    res = {}

    def fb():
        o = fwd()
        o.backward(GRAD[0])

    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fb()
        torch.cuda.synchronize()
        res["first"] = time.perf_counter() - t0
        res["mem"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        res.update(fwd="OOM", fb="OOM")
    except Exception:  # noqa: BLE001 - a failing cell must not stop the table
        traceback.print_exc(limit=3)
        res.update(fwd="err", fb="err")
    torch.cuda.empty_cache()
    return res, fb


def flex_fn(q, k, v, cu, nseq, L, bs, top_k):
    """MoBA as a FlexAttention BlockMask built from our routing (see module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from kernels.routing import block_layout, block_means, route_topk

    TILE = 128
    ksel = top_k - 1
    with torch.no_grad():
        layout = block_layout([L] * nseq, bs, 0, q.device)
        if ksel > 0:
            sel = route_topk(q, block_means(k, layout), layout, top_k, bs, False)  # (H, T, ksel) global ids
            nb_seq = math.ceil(L / bs)
            local = torch.where(sel >= 0, sel % nb_seq, -1).view(H, nseq, L, ksel).transpose(0, 1).contiguous()
        else:
            local = torch.full((nseq, H, L, 1), -1, dtype=torch.int32, device=q.device)
        nqt = math.ceil(L / TILE)
        nblk = math.ceil(L / bs)
        # union per 128-query tile of the chosen MoBA blocks, plus the own block
        chosen = torch.zeros(nseq, H, nqt, nblk + 1, dtype=torch.bool, device=q.device)
        tile_of_q = (torch.arange(L, device=q.device) // TILE).view(1, 1, L, 1).expand_as(local)
        chosen[torch.arange(nseq, device=q.device).view(-1, 1, 1, 1).expand_as(local),
               torch.arange(H, device=q.device).view(1, -1, 1, 1).expand_as(local),
               tile_of_q, torch.where(local >= 0, local, nblk).long()] = True
        chosen = chosen[..., :nblk]
        qpos = torch.arange(nqt, device=q.device) * TILE
        own_lo, own_hi = qpos // bs, torch.clamp(qpos + TILE - 1, max=L - 1) // bs
        blk = torch.arange(nblk, device=q.device)
        chosen |= ((blk[None, :] >= own_lo[:, None]) & (blk[None, :] <= own_hi[:, None]))[None, None]
        kv_tile_blk = torch.arange(nqt, device=q.device) * TILE // bs  # kv tiles share the q tiling
        kv_mask = chosen[..., kv_tile_blk]  # (nseq, H, nqt, nkvt)
        kv_mask &= (torch.arange(nqt, device=q.device)[None, :] <= torch.arange(nqt, device=q.device)[:, None])
        kv_num = kv_mask.sum(-1, dtype=torch.int32)
        kv_idx = torch.argsort(kv_mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        del kv_mask, chosen

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // bs, kv_idx // bs
        m = (qb == kb) & (kv_idx <= q_idx)
        for j in range(local.shape[-1]):
            m = m | (local[b, h, q_idx, j] == kb)
        return m

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(L, L))
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda: flex(*(x.view(nseq, L, H, D).transpose(1, 2) for x in (q, k, v)),
                        block_mask=bm).transpose(1, 2).reshape(nseq * L, H, D)


def reference64(q, k, v, do, lens, bs, top_k, group):
    """float64 MoBA (routing in fp32 as the definition says) and its gradients, one document at a time."""
    from moba_core.reference import _doc_selection_mask

    outs, grads = [], [[], [], []]
    s = 0
    for L in lens:
        qd, kd, vd = (x[s:s + L].detach().double().requires_grad_(True) for x in (q, k, v))
        g = q.shape[1] // k.shape[1]
        mask = _doc_selection_mask(q[s:s + L], k[s:s + L], bs, top_k, group)  # (HQ, L, L)
        sc = torch.einsum("lhd,mhd->hlm", qd, kd.repeat_interleave(g, 1)) / math.sqrt(q.shape[-1])
        p = torch.softmax(sc.masked_fill(~mask, float("-inf")), -1)
        o = torch.einsum("hlm,mhd->lhd", p, vd.repeat_interleave(g, 1))
        gr = torch.autograd.grad(o, (qd, kd, vd), do[s:s + L].double())
        outs.append(o.detach())
        for a, b in zip(grads, gr):
            a.append(b)
        s += L
    return [torch.cat(outs)] + [torch.cat(x) for x in grads]


CHECK_CASES = [  # (docs, HQ, HKV, D, block, top_k, group routing)
    ([4096], 16, 16, 128, 512, 3, False),
    ([1000, 3000, 77], 9, 3, 128, 256, 4, True),
    ([1500, 2600], 8, 2, 64, 128, 5, False),
    ([3000], 6, 6, 96, 256, 3, False),
    ([700, 2100], 4, 4, 128, 128, 1, False),
    ([2048, 2048], 12, 4, 128, 256, 8, False),
    ([5000, 3000], 8, 4, 128, 1024, 3, False),  # blocks above 512 keys: dQ in its own pass
    # dense parts of 4K+ tokens: cuDNN in bf16 on Hopper (a 4096-token prefix; a 5000-token document, padded)
    ([9000, 5000], 8, 4, 128, 2048, 3, False),
    ([6000], 8, 2, 64, 2048, 3, False),
]


def correctness_check():
    """Relative (Frobenius) error of o, dq, dk, dv against float64, bf16 (limit 1e-2) and fp32 (limit 1e-5),
    dense path on and off."""
    from moba_core import moba_attention

    torch.manual_seed(0)
    lines = []
    for (lens, hq, hkv, d, bs, top_k, group), dtype, dense in itertools.product(
            CHECK_CASES, (torch.bfloat16, torch.float32), ("1", "0")):
        os.environ["MOBA_DENSE_PATH"] = dense
        # fp32: route in exact fp32 like the reference, so a near-tie of two block scores cannot flip
        os.environ["MOBA_ROUTE_PREC"] = "ieee" if dtype == torch.float32 else "tf32x3"
        T = sum(lens)
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
        q = torch.randn(T, hq, d, device="cuda").to(dtype)
        k, v = (torch.randn(T, hkv, d, device="cuda").to(dtype) for _ in range(2))
        do = torch.randn(T, hq, d, device="cuda").to(dtype)
        ins = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o = moba_attention(*ins, cu, max(lens), bs, top_k, group_routing=group, backend="triton")
        got = [o, *torch.autograd.grad(o, ins, do)]
        ref = reference64(q, k, v, do, lens, bs, top_k, group)
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        limit = 1e-2 if dtype == torch.bfloat16 else 1e-5
        ok = all(math.isfinite(e) and e <= limit for e in errs)
        name = f"{'+'.join(map(str, lens))}:{bs}:{top_k} {hq}/{hkv} D{d}{' group' if group else ''}"
        lines.append(f"- {str(dtype)[6:]} dense_path={dense} `{name}`: rel. error o/dq/dk/dv = "
                     + " / ".join(f"{x:.1e}" for x in errs) + f" ({'ok' if ok else 'FAIL'}, limit {limit:.0e})")
        print(lines[-1], flush=True)
    os.environ["MOBA_DENSE_PATH"] = "1"
    os.environ.pop("MOBA_ROUTE_PREC")
    return lines


def fmt(x, nd=2):
    return x if isinstance(x, str) else f"{x:.{nd}f}"


COLD_PREFIX = "cold_first_call_s="


def cold_first_call(point: str, heads: int = H, head_dim: int = D) -> float:
    """Seconds of the first fwd+bwd of the ``triton`` backend at ``point`` (bf16 on CUDA; fp32 on a CPU, under
    ``TRITON_INTERPRET=1``) in this process: every kernel compiled, launcher built and lazy import paid, as in a
    user's first training step. Meant for a new process with an empty Triton cache (``cold_first_calls``); the CUDA
    context is made before the clock starts."""
    from moba_core import moba_attention

    nseq, L, bs, top_k = parse_point(point)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    T = nseq * L
    q, k, v = (torch.randn(T, heads, head_dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(T, heads, head_dim, device=dev, dtype=dtype)
    cu = torch.arange(nseq + 1, device=dev, dtype=torch.int32) * L
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    moba_attention(q, k, v, cu, L, bs, top_k, backend="triton").backward(do)
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def cold_first_calls(points: list[str], heads: int = H, head_dim: int = D, timeout_s: float = 600) -> list:
    """(point, seconds or an error text) of each point's first fwd+bwd (``cold_first_call``), each in a new process
    with an empty Triton cache: what a first step costs on a machine that never compiled these kernels (issue 9's
    first-call target, 20 s; the table's "first call" column comes after its float64 check compiled them)."""
    out = []
    for p in points:
        cmd = [sys.executable, "-m", "train.bench_kernels", "--cold-one", p, "--cold-shape", f"{heads}:{head_dim}"]
        try:
            with tempfile.TemporaryDirectory(prefix="moba-cold-triton-") as cache:
                proc = subprocess.run(cmd, env={**os.environ, "TRITON_CACHE_DIR": cache}, capture_output=True,
                                      text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            out.append((p, f"over {timeout_s:.0f} s"))
            continue
        found = [line[len(COLD_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(COLD_PREFIX)]
        out.append((p, float(found[-1]) if proc.returncode == 0 and found else
                    f"err: {(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="[NSEQx]SEQ_LEN:BLOCK:TOP_K ...")
    ap.add_argument("--methods", default="full,flex,triton", help=f"comma list out of {','.join(METHODS)}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check against float64")
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--json", default="results/kernels.json")
    ap.add_argument("--warm-cache", action="store_true", help="keep Triton's compile cache (first call not cold)")
    ap.add_argument("--cold", action="store_true", help="only each point's first fwd+bwd of the triton backend, "
                    "each in a new process with an empty Triton cache (the table is not run or written)")
    ap.add_argument("--cold-one", metavar="POINT", help=argparse.SUPPRESS)  # the worker of --cold
    ap.add_argument("--cold-shape", default=f"{H}:{D}", help=argparse.SUPPRESS)  # HEADS:HEAD_DIM of --cold
    args = ap.parse_args(argv)
    heads, head_dim = (int(x) for x in args.cold_shape.split(":"))
    if args.cold_one:
        print(f"{COLD_PREFIX}{cold_first_call(args.cold_one, heads, head_dim):.3f}", flush=True)
        return 0
    if args.cold:
        print("| point | cold first call s (new process, empty Triton cache; target <= 20) |\n|---|---|")
        results = cold_first_calls(args.points, heads, head_dim)
        for p, sec in results:
            print(f"| {p} | {sec if isinstance(sec, str) else f'{sec:.1f}'} |", flush=True)
        return 1 if any(isinstance(sec, str) for _, sec in results) else 0  # a point that failed: exit 1
    if not torch.cuda.is_available():
        print("error: python -m train.bench_kernels needs a CUDA device (the kernels are tested on the CPU by "
              "make test)", file=sys.stderr)
        return 2
    if not args.warm_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="moba-bench-triton-")
    from moba_core import moba_attention
    from moba_core.triton_backend import moba_routing

    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"--methods: unknown {sorted(bad)}; choose from {METHODS}")
    lines = [] if args.no_check else correctness_check()
    header = ("| point | method | fwd ms | fwd+bwd ms | speed-up fwd / fwd+bwd | ideal | useful TFLOP/s | "
              "first call s | peak GiB (x full) | routing / fwd / bwd ms |")
    rows, records = [header, "|" + "---|" * 10], []
    full_by_len = {}
    gpu, today = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    for p in args.points:
        nseq, L, bs, top_k = parse_point(p)
        T = nseq * L
        torch.manual_seed(0)
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        GRAD[0] = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(nseq + 1, device="cuda", dtype=torch.int32) * L
        att = nseq * attended_positions(L, bs, top_k)
        causal = nseq * L * (L + 1) // 2
        ideal = causal / att
        fns = {}
        if "full" in methods:
            if T <= 524288:
                # from the packed (T, H, D) tensors, as the other methods: the views are part of the call
                fns["full"] = (lambda: torch.nn.functional.scaled_dot_product_attention(
                    *(x.view(nseq, L, H, D).transpose(1, 2) for x in (q, k, v)),
                    is_causal=True).transpose(1, 2).reshape(T, H, D), causal)
            else:
                fns["full"] = ("est", causal)
        if "flex" in methods:
            if L <= 131072:
                try:
                    fns["flex"] = (flex_fn(q, k, v, cu, nseq, L, bs, top_k), att)
                except Exception:  # noqa: BLE001
                    traceback.print_exc(limit=3)
                    fns["flex"] = ("err", att)
        for backend in ("flash", "triton"):
            if backend in methods:
                fns[backend] = ((lambda b=backend: moba_attention(q, k, v, cu, L, bs, top_k, backend=b)), att)
        # first call and peak memory of each method alone, then each method timed in its own blocks (timed_many)
        res_of, fb_of = {}, {}
        for name, (fn, _) in fns.items():
            if fn == "est":
                half = full_by_len.get((nseq, L // 2))
                res_of[name] = ({"fwd": 4 * half["fwd"], "fb": 4 * half["fb"], "mem": 2 * half["mem"], "first": "-",
                                 "est": True} if half and all(isinstance(half[x], float) for x in ("fwd", "fb", "mem"))
                                else {"fwd": "-", "fb": "-"})
            elif fn == "err":
                res_of[name] = {"fwd": "err", "fb": "err"}
            else:
                res_of[name], fb_of[name] = measure(fn)
            q.grad = k.grad = v.grad = None
        live = [n for n in fb_of if "fb" not in res_of[n]]
        for key, ms in (("fb", timed_many({n: fb_of[n] for n in live}, args.reps)),
                        ("fwd", timed_many({n: fns[n][0] for n in live}, args.reps))):
            for n, cell in ms.items():
                res_of[n][key] = cell
        q.grad = k.grad = v.grad = None
        torch.cuda.empty_cache()
        full_res = res_of.get("full")
        if full_res is not None:
            full_by_len[(nseq, L)] = full_res
        for name, (_, pairs) in fns.items():
            res = res_of[name]
            split = "-"
            if name == "triton" and isinstance(res.get("fb"), float) and L > top_k * bs:  # else no routing runs
                with torch.no_grad():
                    lens = [L] * nseq
                    res["routing"] = timed(lambda: moba_routing(q, k, lens, bs, top_k, False, top_k), args.reps)
                if isinstance(res.get("fwd"), float):
                    split = f"{res['routing']:.1f} / {res['fwd']:.1f} / {res['fb'] - res['fwd']:.1f}"
            rows.append(row_text(p, name, res, full_res, ideal, pairs, split))
            records.append(record(p, name, res, full_res, gpu, today))
            print(rows[-1], flush=True)
        q = k = v = fns = None
        GRAD[0] = None
        GRAPHS.clear()  # a point's CUDA graphs (short calls) would hold memory through the next points' peaks
        torch.cuda.empty_cache()
        write_section(args, argv, lines, rows)
        write_json(args.json, records)
    print(write_section(args, argv, lines, rows))


def row_text(p, name, res, full_res, ideal, pairs, split):
    """One markdown row of the table."""
    est = " (est.)" if res.get("est") else ""
    sp = "-"
    if full_res and all(isinstance(x, float) for x in (res["fwd"], res["fb"], full_res["fwd"], full_res["fb"])):
        sp = f"{full_res['fwd'] / res['fwd']:.2f}x / {full_res['fb'] / res['fb']:.2f}x"
    tf = f"{3.5 * 4 * D * H * pairs / (res['fb'] * 1e-3) / 1e12:.0f}" if isinstance(res["fb"], float) else "-"
    mem = fmt(res["mem"]) if "mem" in res else "-"
    if full_res and "mem" in res and "mem" in full_res and name != "full":
        mem += f" ({res['mem'] / full_res['mem']:.2f}x)"
    first = fmt(res.get("first", "-"), 1)
    return (f"| {p} | {name}{est} | {fmt(res['fwd'])} | {fmt(res['fb'])} | {sp} | {ideal:.1f}x | {tf} | {first} | "
            f"{mem} | {split} |")


def record(p, name, res, full_res, gpu, today) -> dict:
    """One JSON row of ``results/kernels.json``."""
    num = lambda x: x if isinstance(x, float) else None  # noqa: E731
    out = {"point": p, "method": name, "fwd_ms": num(res.get("fwd")), "fwdbwd_ms": num(res.get("fb")),
           "first_call_s": num(res.get("first")), "peak_gib": num(res.get("mem")), "gpu": gpu, "date": today,
           "estimated": bool(res.get("est"))}
    if "routing" in res:
        out["routing_ms"] = res["routing"]
        if num(res.get("fwd")) and num(res.get("fb")):
            out["bwd_ms"] = res["fb"] - res["fwd"]
    if full_res and num(res.get("fb")) and num(full_res.get("fb")):
        out["speedup_fwdbwd"] = full_res["fb"] / res["fb"]
    return out


def write_json(path: str, records: list[dict]) -> None:
    """Replace ``path`` with the rows of this run."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def write_section(args, argv, lines, rows):
    """Replace the marked section of ``args.output`` (rewritten after every point, so a cut run keeps rows)."""
    import triton

    gpu = torch.cuda.get_device_name()
    cmd = shown_command("train.bench_kernels", sys.argv[1:] if argv is None else list(argv))
    section = "\n".join([
        f"## MoBA kernels: `{cmd}`",
        "",
        f"{datetime.date.today().isoformat()}, {gpu}, torch {torch.__version__}, Triton {triton.__version__}; "
        f"bf16, {H} heads, head dim {D}; points `[NSEQx]SEQ_LEN:BLOCK:TOP_K`.",
        "",
        *lines,
        "",
        *rows,
    ])
    replace_marked_section(Path(args.output), MARK_START, MARK_END, section)
    return section


if __name__ == "__main__":
    sys.exit(main())
