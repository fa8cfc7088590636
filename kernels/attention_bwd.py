"""MoBA block-sparse attention backward: dq, dk, dv without materialising attention matrices.

With the global LSE of the forward (base 2) and ``delta = rowsum(dO * O)`` per (head, query), every
(query, key) pair contributes independently (the flash-attention identity ``dS = P * (dP - delta)``
with P formed from the merged LSE), so the current block and the selected blocks are separate parts
of one exact backward.

Kernels (launched over upper bounds; surplus programs exit):
    ``_delta_kernel``     delta fp32 (HQ, T).
    ``_dkdv_kernel``      key-block-major: a program owns (KV head, block, tile of BLOCK_N keys) and
                          accumulates dK, dV in registers over (a) the block's own queries (causal) for
                          the G query heads of the group and (b) every query in the block's lists (one
                          list per query head, or one per KV head under group routing). It writes dK, dV
                          once: no atomics, and a block nobody selects gets its diagonal part only
                          (exact zeros where dO is zero, never NaN).
    ``_diag_dq_kernel``   query-major causal dQ inside the current block; initialises the fp32 dQ
                          accumulator with a plain store.
    ``_list_dq_kernel``   key-block-major over the same query tiles as the forward lists; a program
                          accumulates dQ of its gathered queries over the block's keys in registers and
                          adds it with one fp32 atomic add per (query, block, element).
Layouts, dtypes and head dims as in ``kernels.attention_fwd``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention_fwd import _gather_rows, dot_precision, list_grid_args, tuned_config_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


def _prune(configs, named_args, **kwargs):
    """Keep configs whose tiles divide the block; one config under the interpreter."""
    bs = named_args.get("BLOCK_SIZE", kwargs.get("BLOCK_SIZE"))
    keep = [c for c in configs if bs is None or bs % c.kwargs.get("BLOCK_N", 16) == 0]
    keep = keep or configs[-1:]
    return keep[:1] if INTERPRET else keep


_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3),
                         (16, 16, 4, 1)]
]
_DQ_CONFIGS = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2), triton.Config({"BLOCK_N": 16}, num_warps=4)]
_DIAG_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (64, 64, 4, 2), (16, 16, 4, 1)]
]


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh, T,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    t = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < T) & (offs_d[None, :] < D)
    # [BLOCK_M, BLOCK_D]
    o = tl.load(o_ptr + t[:, None] * stride_ot + hq * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + t[:, None] * stride_dot + hq * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(delta_ptr + hq * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=t < T)


@triton.jit
def _dkdv_tile(k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, t, rmask, hq, T, stride_qt, stride_qh,
               stride_dot, stride_doh, qk_scale, offs_d, dmask, causal_mask, DOT_PREC: tl.constexpr):
    """dK, dV increments ([BLOCK_N, BLOCK_D] each, unscaled dK) from one tile of queries."""
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + t[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(do_ptr + t[:, None] * stride_dot + hq * stride_doh + offs_d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptr + hq * T + t, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + hq * T + t, mask=rmask, other=0.0)
    # [BLOCK_N, BLOCK_M]
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pt = tl.where(causal_mask, tl.exp2(st - lse[None, :]), 0.0)
    dv = tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["T_BUCKET", "D", "BLOCK_SIZE", "KSEL"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    entries_ptr, list_ptr, block_start_ptr, block_len_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    T, NB, qk_scale, sm_scale, T_BUCKET,
    G: tl.constexpr, NLISTS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NKT: tl.constexpr = (BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0).to(tl.int64)
    hkv = tl.program_id(1).to(tl.int64)
    blk = pid // NKT
    n0 = (pid % NKT) * BLOCK_N
    blen = tl.load(block_len_ptr + blk)
    if n0 >= blen:
        return
    start = tl.load(block_start_ptr + blk)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < blen
    kv_rows = (start + offs_n).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # [BLOCK_N, BLOCK_D]
    k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # (a) the block's own queries, causal: rows from the first key of this tile to the block end
    for j in range(G):
        hq = hkv * G + j
        for m in range(n0 - n0 % BLOCK_M, blen, BLOCK_M):
            offs_m = m + tl.arange(0, BLOCK_M)
            rmask = offs_m < blen
            cm = (offs_m[None, :] >= offs_n[:, None]) & rmask[None, :] & nmask[:, None]
            ddk, ddv = _dkdv_tile(k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start + offs_m, rmask, hq, T,
                                  stride_qt, stride_qh, stride_dot, stride_doh, qk_scale, offs_d, dmask, cm,
                                  DOT_PREC)
            dk += ddk
            dv += ddv
    # (b) the queries that selected this block (only full blocks can be selected)
    if KSEL > 0:
        if blen == BLOCK_SIZE:
            for li in range(NLISTS):
                # NLISTS = G: per-head lists (list head hq); NLISTS = 1: one list per KV head
                hr = hkv * NLISTS + li
                lst = hr * NB + blk
                e0 = tl.load(list_ptr + lst)
                e1 = tl.load(list_ptr + lst + 1)
                for j in range(G // NLISTS):
                    hq = hkv * G + li + j
                    for e in range(e0, e1, BLOCK_M):
                        offs_e = e + tl.arange(0, BLOCK_M)
                        rmask = offs_e < e1
                        ent = tl.load(entries_ptr + offs_e, mask=rmask, other=0).to(tl.int64)
                        t = ent // KSEL % T
                        cm = rmask[None, :] & nmask[:, None]
                        ddk, ddv = _dkdv_tile(k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, t, rmask, hq, T,
                                              stride_qt, stride_qh, stride_dot, stride_doh, qk_scale, offs_d,
                                              dmask, cm, DOT_PREC)
                        dk += ddk
                        dv += ddv
    omask = nmask[:, None] & dmask[None, :]
    tl.store(dk_ptr + kv_rows[:, None] * stride_dkt + hkv * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=omask)
    tl.store(dv_ptr + kv_rows[:, None] * stride_dvt + hkv * stride_dvh + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dq_tile(q, do, lse, delta, k_ptr, v_ptr, kv_rows, hkv, stride_kt, stride_kh, stride_vt, stride_vh,
             qk_scale, offs_d, dmask, kmask, smask, DOT_PREC: tl.constexpr):
    """Unscaled dQ increment [BLOCK_M, BLOCK_D] from one tile of keys."""
    # [BLOCK_N, BLOCK_D]
    k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.where(smask, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _list_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqacc_ptr,
    entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, block_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, NB, NL, qk_scale, sm_scale, T_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr, NHEADS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if tl.load(tile_list_ptr + pid) >= NL:
        return
    lst, me, t, slot = _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, NB, T, KSEL, BLOCK_M)
    hr = lst // NB
    blk = lst % NB
    hkv = hr // (G // NHEADS)
    kstart = tl.load(block_start_ptr + blk)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rmask = me[:, None] & dmask[None, :]
    for j in range(NHEADS):
        if GROUP:
            hq = hkv * G + j
        else:
            hq = hr
        # [BLOCK_M, BLOCK_D]
        q = tl.load(q_ptr + t[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(do_ptr + t[:, None] * stride_dot + hq * stride_doh + offs_d[None, :], mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + hq * T + t, mask=me, other=0.0)
        delta = tl.load(delta_ptr + hq * T + t, mask=me, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n in range(0, BLOCK_SIZE, BLOCK_N):
            offs_n = n + tl.arange(0, BLOCK_N)
            kmask = offs_n < BLOCK_SIZE
            dq += _dq_tile(q, do, lse, delta, k_ptr, v_ptr, (kstart + offs_n).to(tl.int64), hkv, stride_kt,
                           stride_kh, stride_vt, stride_vh, qk_scale, offs_d, dmask, kmask,
                           me[:, None] & kmask[None, :], DOT_PREC)
        tl.atomic_add(dqacc_ptr + (t * HQ + hq)[:, None] * D + offs_d[None, :], dq * sm_scale, mask=rmask)


@triton.autotune(configs=_DIAG_DQ_CONFIGS, key=["T_BUCKET", "D", "BLOCK_SIZE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _diag_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqacc_ptr, block_start_ptr, block_len_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, qk_scale, sm_scale, T_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    me = offs_m < blen
    t = start + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rmask = me[:, None] & dmask[None, :]
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + t[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=rmask, other=0.0)
    do = tl.load(do_ptr + t[:, None] * stride_dot + hq * stride_doh + offs_d[None, :], mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + hq * T + t, mask=me, other=0.0)
    delta = tl.load(delta_ptr + hq * T + t, mask=me, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(0, tl.minimum(m0 + BLOCK_M, blen), BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        kmask = offs_n < blen
        smask = (offs_n[None, :] <= offs_m[:, None]) & kmask[None, :] & me[:, None]
        dq += _dq_tile(q, do, lse, delta, k_ptr, v_ptr, (start + offs_n).to(tl.int64), hkv, stride_kt,
                       stride_kh, stride_vt, stride_vh, qk_scale, offs_d, dmask, kmask, smask, DOT_PREC)
    tl.store(dqacc_ptr + (t * HQ + hq)[:, None] * D + offs_d[None, :], dq * sm_scale, mask=rmask)


def moba_bwd(do, q, k, v, o, lse, layout: dict, lists: dict | None, top_k: int, block_size: int,
             softmax_scale: float, group_routing: bool):
    """Backward of MoBA attention: returns dq, dk, dv in the inputs' dtype and layout (T, H, D)."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    ksel = top_k - 1
    nb = layout["NB"]
    dev = q.device
    BLOCK_D = max(16, triton.next_power_of_2(D))
    qk_scale = softmax_scale * LOG2E
    delta = torch.empty((HQ, T), device=dev, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(T, 64), HQ)](o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
                                            T, D=D, BLOCK_D=BLOCK_D, BLOCK_M=64)
    common = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse_ptr=lse, delta_ptr=delta, block_start_ptr=layout["block_start"],
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=do.stride(0), stride_doh=do.stride(1),
        T=T, qk_scale=qk_scale, sm_scale=softmax_scale, T_BUCKET=triton.next_power_of_2(max(T, 1)),
        G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_SIZE=block_size, DOT_PREC=dot_precision(q.dtype),
    )
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dummy = layout["block_start"]
    grid = lambda meta: (nb * triton.cdiv(block_size, meta["BLOCK_N"]), HKV)
    _dkdv_kernel[grid](
        dk_ptr=dk, dv_ptr=dv, entries_ptr=lists["entries"] if lists else dummy,
        list_ptr=lists["list_ptr"] if lists else dummy, block_len_ptr=layout["block_len"],
        stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
        NB=nb, NLISTS=1 if group_routing else G, KSEL=ksel, **common,
    )
    dqacc = torch.empty((T, HQ, D), device=dev, dtype=torch.float32)
    grid = lambda meta: (nb * triton.cdiv(block_size, meta["BLOCK_M"]), HQ)
    _diag_dq_kernel[grid](dqacc_ptr=dqacc, block_len_ptr=layout["block_len"], HQ=HQ, **common)
    if ksel > 0:
        hr = HKV if group_routing else HQ
        cfg = _pick_dq_config(block_size, lists["tile_m"])
        _list_dq_kernel[(lists["max_tiles"],)](
            dqacc_ptr=dqacc, NB=nb, NL=hr * nb, HQ=HQ, GROUP=group_routing,
            NHEADS=G if group_routing else 1, KSEL=ksel, BLOCK_M=lists["tile_m"],
            **list_grid_args(lists), **common, **cfg,
        )
    return dqacc.to(q.dtype), dk, dv


def _pick_dq_config(block_size: int, tile_m: int) -> dict:
    """Fixed config of the atomic dQ list kernel (atomics rule out autotuning by reruns)."""
    if INTERPRET or block_size % 64:
        return tuned_config_kwargs(None, _DQ_CONFIGS[-1])
    return dict(BLOCK_N=64, num_warps=8 if tile_m >= 128 else 4, num_stages=2)
