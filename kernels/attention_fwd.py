"""MoBA block-sparse attention forward, key-block-major, exact softmax with a saved LSE.

Why key-block-major: MoBA routes per token, so the 64-128 queries of a query tile choose nearly every
earlier block between them; a query-tile-major kernel would either visit that union (about half of all
causal tiles, FlexAttention's cost) or degrade to one query per program. Turning the problem around, a
program owns one (head, key block) and a tile of the queries that chose it (gathered through the lists
of ``kernels.routing.build_block_lists``): K and V of the block stream once per tile and every
``tl.dot`` is a dense [BLOCK_M x BLOCK_N] tile. The current block is an ordinary causal flash tile on the
diagonal (query-major there, since all its queries attend it).

Passes (all launched over upper bounds, no host sync):
    1. ``_list_fwd_kernel`` PASS=1: per (query, slot) the LSE of the scores against the selected block
       -> ``lse_part`` fp32 (HQ, T, KSEL) (-inf for an empty slot).
    2. ``_diag_fwd_kernel``: causal attention inside the current block; merges its LSE with the KSEL
       partial LSEs into the global LSE (``lse`` fp32 (HQ, T), base 2, of ``s * scale * log2(e)``) and
       initialises the fp32 output accumulator with the diagonal part already normalised by it.
    3. ``_list_fwd_kernel`` PASS=2: recomputes ``p = exp2(s - lse)`` with the global LSE (no rescaling)
       and adds ``p @ V`` into the accumulator with fp32 atomic adds (one per (query, block, element)).
    This costs 1.5x the matmuls of one pass but needs no (query, slot) partial-output buffer.

Layouts: q, o (T, HQ, D); k, v (T, HKV, D); any strides (int64 offsets). GQA: HQ = G * HKV, k/v never
expanded; per-head routing lists are per query head, group routing lists per KV head (a program then
serves the G heads of its group from one K/V stream). Dtypes fp16 / bf16 / fp32 (fp32 dots in "ieee"
precision). Head dim D <= 128, padded to a power of two >= 16. Selected blocks are always full
(``block_size`` keys), so only the diagonal part needs key masks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


def _prune(configs, named_args, **kwargs):
    """Keep configs whose key tile divides the block and fits it; one config under the interpreter."""
    bs = named_args.get("BLOCK_SIZE", kwargs.get("BLOCK_SIZE"))
    keep = [c for c in configs if bs is None or (bs % c.kwargs.get("BLOCK_N", 16) == 0)]
    keep = keep or configs[-1:]
    return keep[:1] if INTERPRET else keep


# The list kernels use atomics (pass 2) and a host-built tile map, so their query tile is fixed by the
# launcher and only warps / stages are tuned (pass 1 only: re-running pass 2 would add twice).
_LIST_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4), (16, 4, 2)]
]
_DIAG_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (16, 16, 4, 2)]
]


@triton.jit
def _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, NB, T,
                 KSEL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(list, rows) of this program's query tile: list id (-1 when the program is surplus), token, slot."""
    pid = tl.program_id(0).to(tl.int64)
    lst = tl.load(tile_list_ptr + pid).to(tl.int64)
    e0 = tl.load(list_ptr + lst) + (pid - tl.load(tile_first_ptr + lst)) * BLOCK_M
    e1 = tl.load(list_ptr + lst + 1)
    offs_e = e0 + tl.arange(0, BLOCK_M)
    me = offs_e < e1
    ent = tl.load(entries_ptr + offs_e, mask=me, other=0).to(tl.int64)
    return lst, me, ent // KSEL % T, ent % KSEL


@triton.jit
def _list_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lse_part_ptr, lse_ptr, oacc_ptr,
    entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, block_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    T, NB, NL, qk_scale, T_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr, NHEADS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, PASS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if tl.load(tile_list_ptr + pid) >= NL:
        return
    lst, me, t, slot = _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, NB, T, KSEL, BLOCK_M)
    hr = lst // NB
    blk = lst % NB
    hkv = hr // (G // NHEADS)  # NHEADS = G under group routing (lists per KV head), else 1
    kstart = tl.load(block_start_ptr + blk)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for j in range(NHEADS):
        if GROUP:
            hq = hkv * G + j
        else:
            hq = hr
        # [BLOCK_M, BLOCK_D]
        q = tl.load(q_ptr + t[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                    mask=me[:, None] & dmask[None, :], other=0.0)
        if PASS == 1:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        else:
            lse = tl.load(lse_ptr + hq * T + t, mask=me, other=0.0)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n in range(0, BLOCK_SIZE, BLOCK_N):
            offs_n = (kstart + n + tl.arange(0, BLOCK_N)).to(tl.int64)
            # [BLOCK_N, BLOCK_D]
            kk = tl.load(k_ptr + offs_n[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                         mask=dmask[None, :], other=0.0)
            # [BLOCK_M, BLOCK_N]
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale
            if PASS == 1:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
                m_i = m_new
            else:
                vv = tl.load(v_ptr + offs_n[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                             mask=dmask[None, :], other=0.0)
                p = tl.exp2(s - lse[:, None])
                acc += tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
        if PASS == 1:
            tl.store(lse_part_ptr + (hq * T + t) * KSEL + slot, m_i + tl.log2(l_i), mask=me)
        else:
            optrs = oacc_ptr + (t * HQ + hq)[:, None] * D + offs_d[None, :]
            tl.atomic_add(optrs, acc, mask=me[:, None] & dmask[None, :])


@triton.autotune(configs=_DIAG_CONFIGS, key=["T_BUCKET", "D", "BLOCK_SIZE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _diag_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lse_part_ptr, lse_ptr, oacc_ptr, block_start_ptr, block_len_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    T, qk_scale, T_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, KSEL: tl.constexpr, KPAD: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NQT: tl.constexpr = (BLOCK_SIZE + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    blk = pid // NQT
    m0 = (pid % NQT) * BLOCK_M
    blen = tl.load(block_len_ptr + blk)
    if m0 >= blen:
        return
    hkv = hq // G
    start = tl.load(block_start_ptr + blk)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mrow = offs_m < blen
    t = start + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + t[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                mask=mrow[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(m0 + BLOCK_M, blen)
    for n in range(0, hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        kv_rows = (start + offs_n).to(tl.int64)
        kmask = offs_n < blen
        # [BLOCK_N, BLOCK_D]
        kk = tl.load(k_ptr + kv_rows[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(v_ptr + kv_rows[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        # [BLOCK_M, BLOCK_N]
        s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * qk_scale
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
        m_i = m_new
    # rows past the block end have m_i = -inf; keep them finite (they are not stored)
    m_i = tl.where(mrow, m_i, 0.0)
    l_i = tl.where(mrow, l_i, 1.0)
    lse = m_i + tl.log2(l_i)
    if KSEL > 0:
        offs_k = tl.arange(0, KPAD)
        # [BLOCK_M, KPAD]
        lp = tl.load(lse_part_ptr + (hq * T + t)[:, None] * KSEL + offs_k[None, :],
                     mask=mrow[:, None] & (offs_k[None, :] < KSEL), other=float("-inf"))
        mx = tl.maximum(lse, tl.max(lp, axis=1))
        lse = mx + tl.log2(tl.exp2(lse - mx) + tl.sum(tl.exp2(lp - mx[:, None]), axis=1))
    tl.store(lse_ptr + hq * T + t, lse, mask=mrow)
    out = acc * (tl.exp2(m_i - lse))[:, None]
    tl.store(oacc_ptr + (t * HQ + hq)[:, None] * D + offs_d[None, :], out, mask=mrow[:, None] & dmask[None, :])


_list_fwd_tuned = triton.autotune(
    configs=_LIST_CONFIGS, key=["T_BUCKET", "D", "BLOCK_SIZE", "PASS"], prune_configs_by={"early_config_prune": _prune}
)(_list_fwd_kernel)


def tuned_config_kwargs(tuned, fallback: triton.Config) -> dict:
    """Launch kwargs (tile sizes, warps, stages) of an autotuner's last chosen config."""
    cfg = getattr(tuned, "best_config", None) or fallback
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 dots; fp16 / bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def list_grid_args(lists: dict) -> dict:
    return dict(entries_ptr=lists["entries"], list_ptr=lists["list_ptr"], tile_list_ptr=lists["tile_list"],
                tile_first_ptr=lists["tile_first"])


def moba_fwd(q, k, v, layout: dict, lists: dict | None, top_k: int, block_size: int, softmax_scale: float,
             group_routing: bool):
    """Forward of MoBA attention given the routing.

    Args:
        q: (T, HQ, D); k, v: (T, HKV, D); layout: ``routing.block_layout``; lists: ``build_block_lists``
        (None when ``top_k == 1``).
    Returns:
        o (T, HQ, D) in q's dtype and lse fp32 (HQ, T) (base 2, of ``s * softmax_scale * log2(e)``).
    """
    T, HQ, D = q.shape
    HKV = k.shape[1]
    ksel = top_k - 1
    nb = layout["NB"]
    qk_scale = softmax_scale * LOG2E
    dev = q.device
    common = dict(
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), T=T, qk_scale=qk_scale,
        T_BUCKET=triton.next_power_of_2(max(T, 1)), HQ=HQ, G=HQ // HKV, KSEL=ksel, D=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size, DOT_PREC=dot_precision(q.dtype),
    )
    lse = torch.empty((HQ, T), device=dev, dtype=torch.float32)
    oacc = torch.empty((T, HQ, D), device=dev, dtype=torch.float32)
    lse_part = None
    if ksel > 0:
        lse_part = torch.full((HQ, T, ksel), float("-inf"), device=dev, dtype=torch.float32)
        hr = HKV if group_routing else HQ
        lgrid = (lists["max_tiles"],)
        largs = dict(q_ptr=q, k_ptr=k, v_ptr=v, lse_part_ptr=lse_part, lse_ptr=lse, oacc_ptr=oacc,
                     block_start_ptr=layout["block_start"], NB=nb, NL=hr * nb, GROUP=group_routing,
                     NHEADS=HQ // HKV if group_routing else 1,
                     BLOCK_M=lists["tile_m"], **list_grid_args(lists), **common)
        _list_fwd_tuned[lgrid](PASS=1, **largs)
    grid = lambda meta: (nb * triton.cdiv(block_size, meta["BLOCK_M"]), HQ)
    _diag_fwd_kernel[grid](
        q_ptr=q, k_ptr=k, v_ptr=v, lse_part_ptr=lse_part if lse_part is not None else lse, lse_ptr=lse,
        oacc_ptr=oacc, block_start_ptr=layout["block_start"], block_len_ptr=layout["block_len"],
        KPAD=max(2, triton.next_power_of_2(max(ksel, 1))), **common,
    )
    if ksel > 0:
        # pass 2 adds atomically: never autotuned (a rerun would add twice); it reuses pass 1's config
        _list_fwd_kernel[lgrid](PASS=2, **largs, **tuned_config_kwargs(_list_fwd_tuned, _LIST_CONFIGS[0]))
    return oacc.to(q.dtype), lse


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)
