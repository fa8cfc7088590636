"""MoBA kernel benchmark (GPU): ``python -m kernels.bench [--points ...] [--skip flex,flash] [--reps N]``.

bf16, 16 heads, head dim 128. Side by side per point: full causal attention (PyTorch SDPA), MoBA as a
FlexAttention block mask, our ``flash`` backend, our ``triton`` backend. Columns: fwd ms, fwd+bwd ms,
speed-up over full (fwd / fwd+bwd), ideal speed-up (causal key positions / key positions MoBA attends),
useful TFLOP/s (fwd+bwd, counting 4*D FLOPs per attended (query, key) pair forward and 2.5x that
backward), peak memory (GiB, inputs included) and, for the triton backend, the routing share of fwd+bwd.
The table is printed and written into ``BENCHMARKS.md`` between marker comments (replaced on rerun).

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
import math
import os
import re
import sys
import traceback

import torch

DEFAULT_POINTS = ["8192:512:3", "32768:2048:3", "131072:4096:12", "131072:512:8", "524288:4096:12",
                  "2x32768:128:8", "2x65536:128:8", "2x131072:128:8"]
H, D = 16, 128
MARK_START, MARK_END = "<!-- kernels-bench:start -->", "<!-- kernels-bench:end -->"


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


def timed(fn, reps: int):
    """Median milliseconds of fn() over reps runs after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        if sum(times) > 3000:
            break
    return sorted(times)[len(times) // 2]


def measure(fwd, reps):
    """(fwd ms, fwd+bwd ms, peak GiB) of fwd() -> output with requires_grad; cells 'OOM' / 'err'."""
    res = {}
    try:
        res["fwd"] = timed(lambda: fwd(), reps)

        def fb():
            o = fwd()
            o.backward(GRAD[0])

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        res["fb"] = timed(fb, reps)
        res["mem"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        res.setdefault("fwd", "OOM")
        res.setdefault("fb", "OOM")
    except Exception:  # noqa: BLE001 - a failing cell must not stop the table
        traceback.print_exc(limit=3)
        res.setdefault("fwd", "err")
        res.setdefault("fb", "err")
    torch.cuda.empty_cache()
    return res


GRAD = [None]


def flex_fn(q, k, v, cu, nseq, L, bs, top_k):
    """MoBA as a FlexAttention BlockMask built from our routing (see module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from kernels.routing import block_layout, block_means, route_topk

    TILE = 128
    ksel = top_k - 1
    with torch.no_grad():
        layout = block_layout(cu, q.shape[0], bs)
        if ksel > 0:
            sel = route_topk(q, block_means(k, layout), layout, top_k, False)  # (H, T, ksel) global ids
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
    qb, kb, vb = (x.view(nseq, L, H, D).transpose(1, 2) for x in (q, k, v))
    return lambda: flex(qb, kb, vb, block_mask=bm).transpose(1, 2).reshape(nseq * L, H, D)


def correctness_check():
    """bf16 triton vs fp32 reference: relative (Frobenius) error of o, dq, dk, dv at a small point."""
    from moba_core import moba_attention_reference
    from moba_core.triton_backend import triton_moba_attention

    torch.manual_seed(0)
    out = {}
    for lens, hq, hkv, bs, top_k, group in [([4096], 16, 16, 512, 3, False), ([1000, 3000, 77], 9, 3, 256, 4, True)]:
        T = sum(lens)
        cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
        q = torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(T, hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16)
        o = triton_moba_attention(q, k, v, cu, max(lens), bs, top_k, group_routing=group)
        g = torch.autograd.grad(o, (q, k, v), do)
        qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        r = moba_attention_reference(qf, kf, vf, cu, max(lens), bs, top_k, group_routing=group)
        rg = torch.autograd.grad(r, (qf, kf, vf), do.float())
        name = f"{'+'.join(map(str, lens))}:{bs}:{top_k} {hq}/{hkv}{' group' if group else ''}"
        out[name] = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((o, *g), (r, *rg))]
    return out


def fmt(x, nd=2):
    return x if isinstance(x, str) else f"{x:.{nd}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="[NSEQx]SEQ_LEN:BLOCK:TOP_K ...")
    ap.add_argument("--triton-only", nargs="*", default=[], help="extra points run with the triton backend only")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: full,flex,flash,triton")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-check", action="store_true", help="skip the bf16 correctness check")
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    from moba_core.triton_backend import moba_routing, triton_moba_attention

    lines = []
    if not args.no_check:
        errs = correctness_check()
        for name, e in errs.items():
            ok = "ok" if max(e) < 1e-2 else "FAIL"
            lines.append(f"- bf16 vs fp32 reference `{name}`: rel. error o/dq/dk/dv = "
                         + " / ".join(f"{x:.1e}" for x in e) + f" ({ok}, limit 1e-2)")
        print("\n".join(lines), flush=True)
    header = ("| point | method | fwd ms | fwd+bwd ms | speed-up fwd / fwd+bwd | ideal | useful TFLOP/s | "
              "peak GiB | routing share |")
    rows = [header, "|" + "---|" * 9]
    for p in [*args.points, *args.triton_only]:
        nseq, L, bs, top_k = parse_point(p)
        skip = set(filter(None, args.skip.split(","))) | ({"full", "flex", "flash"} if p in args.triton_only else set())
        T = nseq * L
        torch.manual_seed(0)
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        GRAD[0] = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(nseq + 1, device="cuda", dtype=torch.int32) * L
        att = nseq * attended_positions(L, bs, top_k)
        causal = nseq * L * (L + 1) // 2
        ideal = causal / att
        methods = {}
        if "full" not in skip:
            qs, ks, vs = (x.view(nseq, L, H, D).transpose(1, 2) for x in (q, k, v))
            methods["full SDPA"] = (lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True).transpose(1, 2).reshape(T, H, D), causal)
        if "flex" not in skip:
            if L <= 131072:
                try:
                    methods["flex"] = (flex_fn(q, k, v, cu, nseq, L, bs, top_k), att)
                except Exception:  # noqa: BLE001
                    traceback.print_exc(limit=3)
                    methods["flex"] = (None, att)
            else:
                methods["flex"] = ("skip", att)
        if "flash" not in skip:
            from moba_core import moba_attention

            methods["flash"] = (lambda: moba_attention(q, k, v, cu, L, bs, top_k, backend="flash"), att)
        if "triton" not in skip:
            methods["triton"] = (lambda: triton_moba_attention(q, k, v, cu, L, bs, top_k), att)
        full_res = None
        for name, (fn, pairs) in methods.items():
            if fn is None or fn == "skip":
                res = {"fwd": "err" if fn is None else "skip", "fb": "err" if fn is None else "skip"}
            else:
                res = measure(fn, args.reps)
            if name == "full SDPA":
                full_res = res
            sp = "-"
            if full_res and all(isinstance(x, float) for x in (res["fwd"], res["fb"], full_res["fwd"], full_res["fb"])):
                sp = f"{full_res['fwd'] / res['fwd']:.1f}x / {full_res['fb'] / res['fb']:.1f}x"
            tf = f"{3.5 * 4 * D * H * pairs / (res['fb'] * 1e-3) / 1e12:.0f}" if isinstance(res["fb"], float) else "-"
            share = "-"
            if name == "triton" and isinstance(res["fb"], float):
                try:
                    rt = timed(lambda: moba_routing(q, k, cu, bs, top_k, False), args.reps)
                    share = f"{100 * rt / res['fb']:.0f}% ({rt:.1f} ms)"
                except Exception:  # noqa: BLE001
                    share = "err"
            mem = fmt(res["mem"]) if "mem" in res else "-"
            row = (f"| {p} | {name} | {fmt(res['fwd'])} | {fmt(res['fb'])} | {sp} | "
                   f"{ideal:.1f}x | {tf} | {mem} | {share} |")
            rows.append(row)
            print(row, flush=True)
            q.grad = k.grad = v.grad = None
        q = k = v = methods = None
        GRAD[0] = None
        torch.cuda.empty_cache()
        write_section(args, argv, lines, rows)
    print(write_section(args, argv, lines, rows))


def write_section(args, argv, lines, rows):
    """Replace the marked section of ``args.output`` (rewritten after every point, so a cut run keeps rows)."""
    import triton

    gpu = torch.cuda.get_device_name()
    cmd = "python -m kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    section = "\n".join([
        MARK_START,
        f"## MoBA kernels: `{cmd.strip()}`",
        "",
        f"{datetime.date.today().isoformat()}, {gpu}, torch {torch.__version__}, Triton {triton.__version__}; "
        f"bf16, {H} heads, head dim {D}; points `[NSEQx]SEQ_LEN:BLOCK:TOP_K`.",
        "",
        *lines,
        "",
        *rows,
        MARK_END,
    ])
    old = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
    if MARK_START in old and MARK_END in old:
        new = old[: old.index(MARK_START)] + section + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    with open(args.output, "w") as f:
        f.write(new)
    return section


if __name__ == "__main__":
    main()
