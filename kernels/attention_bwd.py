"""MoBA block-sparse attention backward for the queries of sparse blocks, FlashAttention-2 style.

With the global LSE of the forward (base 2) and ``delta = rowsum(dO * O)`` per (head, query), every
(query, key) pair contributes independently (the flash-attention identity ``dS = P * (dP - delta)``
with P formed from the merged LSE), so the current block and the selected blocks are separate parts
of one exact backward.

Kernels (launched over upper bounds; surplus programs exit):
    ``_delta_kernel``        delta fp32 (HQ, T) for the rows of sparse blocks.
    ``_gather_rows_kernel``  "gather and densify" (FlashMoBA's term): q, dO, LSE, delta and the token of every
                             list entry copied into list order, per chunk of KV heads, so the key-major kernel
                             below reads contiguous rows (pipelined loads) instead of chasing indices (the
                             indexed version ran at a third of the speed: 400 vs 130 ms at 128K:4096:12).
    ``_dkdv_kernel``         key-block-major, one pass: a program owns (KV head, block, tile of BLOCK_N keys)
                             and accumulates dK, dV in registers over (a) the block's own queries (causal) for
                             the G query heads of the group, when the block is sparse, and (b) every query
                             in the block's lists (one list per query head, or one per KV head under group
                             routing). Each (key tile, query tile) also adds its dQ into an fp32 accumulator
                             (T, HC, D) with one relaxed atomic add: 5 matrix products per pair, no separate
                             dQ pass. dK, dV are written once (a block nobody selects gets its diagonal part
                             only: exact zeros where dO is zero, never NaN).
dK and dV are summed in the order of the lists, dQ (fused) in the order of the atomic adds: both reproducible
to rounding; bitwise under ``torch.use_deterministic_algorithms(True)`` (sorted lists, dQ in its own pass).
Layouts, dtypes and head dims as in ``kernels.attention_fwd``. Rows of dense blocks get zeros in dq (the
caller's dense path overwrites them); every row of dk, dv is written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2E, _gather_rows, dot_precision, head_chunks, partial_row
from .config import kernel_config
from .launch import launch


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, block_start_ptr, block_len_ptr, sparse_ptr,
                  stride_ot, stride_oh, stride_dot, stride_doh, T,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE, BLOCK_M: tl.constexpr):
    NQT = tl.cdiv(BLOCK_SIZE, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    blk = tl.load(sparse_ptr + pid // NQT).to(tl.int64)
    m0 = (pid % NQT) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mrow = offs_m < tl.load(block_len_ptr + blk)
    t = tl.load(block_start_ptr + blk) + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask = mrow[:, None] & (offs_d[None, :] < D)
    # [BLOCK_M, BLOCK_D]
    o = tl.load(o_ptr + t[:, None] * stride_ot + hq * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + t[:, None] * stride_dot + hq * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(delta_ptr + hq * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=mrow)


@triton.jit
def _bwd_tile(k, v, q_rows, do_rows, lse_ptrs, delta_ptrs, dq_rows, rmask, qk_scale, sm_scale, offs_d, dmask,
              causal_mask, DOT_PREC: tl.constexpr, FUSED_DQ: tl.constexpr, MASKED: tl.constexpr):
    """One (key tile, query tile) of the FlashAttention-2 backward: returns the dK (unscaled) and dV
    increments [BLOCK_N, BLOCK_D] and adds the tile's scaled dQ [BLOCK_M, BLOCK_D] into the fp32 rows
    ``dq_rows`` with one relaxed atomic add. Queries come as row pointers ([BLOCK_M] pointers to the first
    element of each q / dO row and to its LSE and delta). 5 matrix products per (query, key) pair; without
    ``FUSED_DQ`` only dK and dV (4 products, ``dq_rows`` unused). Without ``MASKED`` ``causal_mask`` is not
    applied: rows outside ``rmask`` load q = dO = LSE = delta = 0, so their P is 1 and their dS 0 and they add
    nothing to dK / dV (a selected block's key tile is full)."""
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(do_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptrs, mask=rmask, other=0.0)
    delta = tl.load(delta_ptrs, mask=rmask, other=0.0)
    # [BLOCK_N, BLOCK_M]
    pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])
    if MASKED:
        pt = tl.where(causal_mask, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, input_precision=DOT_PREC)
    if FUSED_DQ:
        # [BLOCK_M, BLOCK_D]
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
        tl.atomic_add(dq_rows[:, None] + offs_d[None, :], dq, mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=['LIST0', 'LIST1', 'CAP'])  # layout counts and head chunks: one compile each
def _gather_rows_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, qg_ptr, dog_ptr, lg_ptr, dg_ptr, tg_ptr, entries_ptr, list_ptr,
    stride_qt, stride_qh, stride_dot, stride_doh, T, KSEL: tl.constexpr, LIST0, LIST1, CAP,
    G: tl.constexpr, GROUP: tl.constexpr, NH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Copy q, dO, LSE and delta of every entry of lists [LIST0, LIST1) into list order ("gather and densify"):
    row ``j * CAP + (e - list_ptr[LIST0])`` holds query head j of the entry at sorted position e; ``tg`` int32
    [e - list_ptr[LIST0]] its token."""
    E0 = tl.load(list_ptr + LIST0)
    e_start = E0 + tl.program_id(0).to(tl.int64) * BLOCK_E
    E1 = tl.load(list_ptr + LIST1)
    if e_start >= E1:
        return
    offs = e_start + tl.arange(0, BLOCK_E)
    m = offs < E1
    ent = tl.load(entries_ptr + offs, mask=m, other=0).to(tl.int64)
    t = ent // KSEL % T
    hr = ent // KSEL // T
    offs_d = tl.arange(0, BLOCK_D)
    md = m[:, None] & (offs_d[None, :] < D)
    tl.store(tg_ptr + offs - E0, t.to(tl.int32), mask=m)
    for j in range(NH):
        if GROUP:
            hq = hr * G + j
        else:
            hq = hr
        row = j * CAP + offs - E0
        # [BLOCK_E, BLOCK_D]
        qq = tl.load(q_ptr + t[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :], mask=md)
        tl.store(qg_ptr + row[:, None] * D + offs_d[None, :], qq, mask=md)
        dd = tl.load(do_ptr + t[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :], mask=md)
        tl.store(dog_ptr + row[:, None] * D + offs_d[None, :], dd, mask=md)
        tl.store(lg_ptr + row, tl.load(lse_ptr + hq * T + t, mask=m), mask=m)
        tl.store(dg_ptr + row, tl.load(delta_ptr + hq * T + t, mask=m), mask=m)


@triton.jit(do_not_specialize=['NB', 'LIST0', 'HC', 'HKV0', 'CAP'])  # layout counts and head chunks: one compile each
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dqacc_ptr,
    qg_ptr, dog_ptr, lg_ptr, dg_ptr, tg_ptr, list_ptr, block_start_ptr, block_len_ptr, block_first_ptr, order_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    T, NB, DENSE_BLOCKS, qk_scale, sm_scale, HKV0, HC, LIST0, CAP,
    G: tl.constexpr, NLISTS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE, DOT_PREC: tl.constexpr, FUSED_DQ: tl.constexpr,
    HAS_LISTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NKT = tl.cdiv(BLOCK_SIZE, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    hkv = HKV0 + tl.program_id(1).to(tl.int64)
    blk = tl.load(order_ptr + pid // NKT).to(tl.int64)  # longest lists first (``block_layout``'s work_order)
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
    # (a) the block's own queries, causal, when the block is sparse: rows from this key tile to the block end
    if blk - tl.load(block_first_ptr + blk) >= DENSE_BLOCKS:
        for j in range(G):
            hq = hkv * G + j
            for m in range(n0 - n0 % BLOCK_M, blen, BLOCK_M):
                offs_m = m + tl.arange(0, BLOCK_M)
                rmask = offs_m < blen
                cm = (offs_m[None, :] >= offs_n[:, None]) & rmask[None, :] & nmask[:, None]
                t = start + offs_m
                ddk, ddv = _bwd_tile(k, v, q_ptr + t * stride_qt + hq * stride_qh,
                                     do_ptr + t * stride_dot + hq * stride_doh, lse_ptr + hq * T + t,
                                     delta_ptr + hq * T + t, dqacc_ptr + (t * HC + hq - HKV0 * G) * D, rmask,
                                     qk_scale, sm_scale, offs_d, dmask, cm, DOT_PREC, FUSED_DQ, True)
                dk += ddk
                dv += ddv
    # (b) the queries that selected this block (only full blocks can be selected), read in list order from
    # the gathered copies (contiguous rows: plain pipelined loads); not compiled when top_k = 1
    if HAS_LISTS:
        if blen == BLOCK_SIZE:
            E0 = tl.load(list_ptr + LIST0)
            for li in range(NLISTS):
                # NLISTS = G: per-head lists (list head hq); NLISTS = 1: one list per KV head, G planes
                lst = (hkv * NLISTS + li) * NB + blk
                e0 = tl.load(list_ptr + lst)
                e1 = tl.load(list_ptr + lst + 1)
                for j in range(G // NLISTS):
                    base = j * CAP - E0
                    hq = hkv * G + li * (G // NLISTS) + j
                    for e in range(e0, e1, BLOCK_M):
                        offs_e = e + tl.arange(0, BLOCK_M)
                        rmask = offs_e < e1
                        rows = base + offs_e
                        cm = rmask[None, :] & nmask[:, None]
                        t = rows  # unused without FUSED_DQ
                        if FUSED_DQ:
                            t = tl.load(tg_ptr + offs_e - E0, mask=rmask, other=0).to(tl.int64)
                        ddk, ddv = _bwd_tile(k, v, qg_ptr + rows * D, dog_ptr + rows * D, lg_ptr + rows,
                                             dg_ptr + rows, dqacc_ptr + (t * HC + hq - HKV0 * G) * D, rmask,
                                             qk_scale, sm_scale, offs_d, dmask, cm, DOT_PREC, FUSED_DQ, False)
                        dk += ddk
                        dv += ddv
    omask = nmask[:, None] & dmask[None, :]
    tl.store(dk_ptr + kv_rows[:, None] * stride_dkt + hkv * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=omask)
    tl.store(dv_ptr + kv_rows[:, None] * stride_dvt + hkv * stride_dvh + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dq_tile(q, do, lse, delta, k_ptr, v_ptr, kv_rows, hkv, stride_kt, stride_kh, stride_vt, stride_vh,
             qk_scale, offs_d, dmask, kmask, smask, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """Unscaled dQ increment [BLOCK_M, BLOCK_D] from one tile of keys (``smask`` applied only with ``MASKED``:
    rows that load q = dO = LSE = delta = 0 get dS = 0 without it)."""
    # [BLOCK_N, BLOCK_D]
    k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    # [BLOCK_M, BLOCK_N]
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(smask, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit(do_not_specialize=['NB', 'LIST0', 'LIST1', 'HQ0'])  # layout counts and head chunks: one compile each
def _list_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqpart_ptr,
    entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, block_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, NB, LIST0, LIST1, HQ0, qk_scale,
    G: tl.constexpr, GROUP: tl.constexpr, NHEADS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64) + tl.load(tile_first_ptr + LIST0)
    if pid >= tl.load(tile_first_ptr + LIST1):
        return
    lst, me, t, slot = _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, pid, T, KSEL, BLOCK_M)
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
                           me[:, None] & kmask[None, :], DOT_PREC, False)
        row = ((hq - HQ0) * T + t) * KSEL + slot
        tl.store(dqpart_ptr + row[:, None] * D + offs_d[None, :], dq.to(dqpart_ptr.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=['HQ0'])  # head chunks: one compile for every chunking
def _diag_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dqpart_ptr, sel_ptr,
    block_start_ptr, block_len_ptr, sparse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    T, HQ0, qk_scale, sm_scale,
    G: tl.constexpr, GROUP: tl.constexpr, KSEL, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NQT = tl.cdiv(BLOCK_SIZE, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    hq = HQ0 + tl.program_id(1).to(tl.int64)
    blk = tl.load(sparse_ptr + pid // NQT).to(tl.int64)
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
                       stride_kh, stride_vt, stride_vh, qk_scale, offs_d, dmask, kmask, smask, DOT_PREC, True)
    if KSEL > 0:
        for j in range(KSEL):
            row, ok = partial_row(sel_ptr, hq, hkv, t, me, T, HQ0, KSEL, j, GROUP)
            dq += tl.load(dqpart_ptr + row[:, None] * D + offs_d[None, :], mask=ok[:, None] & dmask[None, :],
                          other=0.0).to(tl.float32)
    tl.store(dq_ptr + t[:, None] * stride_dqt + hq * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rmask)


def fused_dq(block_size: int) -> bool:
    """Whether dQ is accumulated inside the dK/dV kernel (fp32 atomics, 5 products per pair) rather than in
    its own pass (list dQ + diagonal dQ kernels, 3 more products, no atomics).

    Measured on an H200 (``kernels/NOTES.md``, v2c and v2d): one atomic add per (query, key tile) costs less
    than the second pass while a block has few key tiles (block 128: 16.9 vs 22.9 ms at 2x65536:128:8) and
    more beyond: block 512 at head dim 64 (96.6 vs 85.9 ms at 131072:512:8 with 32 query / 8 KV heads; equal
    at head dim 128), block 4096 (290 vs 257 ms at 131072:4096:12). So blocks up to 256 keys. Off under
    ``torch.use_deterministic_algorithms(True)`` (the separate pass is bitwise reproducible).
    ``MOBA_FUSED_DQ=0|1`` overrides both.
    """
    env = os.environ.get("MOBA_FUSED_DQ")
    if env is not None:
        return env != "0"
    return block_size <= 256 and not torch.are_deterministic_algorithms_enabled()


def moba_bwd(do, q, k, v, o, lse, layout: dict, sel, lists: dict | None, top_k: int, block_size: int,
             softmax_scale: float, group_routing: bool, dense_blocks: int, dq, dk, dv, budget_bytes: int):
    """Backward of MoBA attention for the queries of sparse blocks.

    Args:
        do, q, o: (T, HQ, D); k, v: (T, HKV, D); lse fp32 (HQ, T) from ``moba_fwd``; layout, sel, lists
        from ``kernels.routing``; dense_blocks as given to ``block_layout``; dq (T, HQ, D), dk, dv
        (T, HKV, D): output buffers (dk, dv written on every row; dq on the rows of sparse blocks, and with
        zeros on the other rows when ``fused_dq``: the caller's dense path overwrites them); budget_bytes:
        bound of the gathered copies and of the dQ buffers (KV / routing heads are processed in chunks that
        fit).
    With ``fused_dq(block_size)`` dQ is summed with fp32 atomic adds, so its last bits may differ between
    runs. dK and dV are summed in list order: bitwise reproducible when the lists are sorted
    (``kernels.routing.build_block_lists``: deterministic mode, or above its scatter size).
    """
    T, HQ, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    ksel = top_k - 1
    nb = layout["NB"]
    dev = q.device
    if layout["NS"] == 0:  # every query is dense: the caller's dense path owns all gradients
        dk.zero_()
        dv.zero_()
        return
    BLOCK_D = max(16, triton.next_power_of_2(D))
    qk_scale = softmax_scale * LOG2E
    delta = torch.empty((HQ, T), device=dev, dtype=torch.float32)
    launch(_delta_kernel, (layout["NS"] * triton.cdiv(block_size, 64), HQ),
        o, do, delta, layout["block_start"], layout["block_len"], layout["sparse_blocks"],
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), T, D=D, BLOCK_D=BLOCK_D,
        BLOCK_SIZE=block_size, BLOCK_M=64)
    strides = dict(stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                   stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=do.stride(0), stride_doh=do.stride(1))
    const = dict(T=T, qk_scale=qk_scale, G=G, KSEL=ksel, D=D, BLOCK_D=BLOCK_D, BLOCK_SIZE=block_size,
                 DOT_PREC=dot_precision(q.dtype))
    fused = fused_dq(block_size)
    cfg = kernel_config("dkdv_fused" if fused else "dkdv", block_size, D, q.dtype)
    nh = G if group_routing else 1  # query heads per routing head
    # per KV head: the gathered q / dO / LSE / delta rows and tokens of its lists (and the fp32 dQ rows)
    head_bytes = G * T * (ksel * (2 * D * q.element_size() + 12) + (4 * D if fused else 0))
    for g0, g1 in head_chunks(HKV, head_bytes, budget_bytes):
        hr0, hr1 = (g0, g1) if group_routing else (g0 * G, g1 * G)
        cap = T * (hr1 - hr0) * ksel  # entries of the chunk, at most
        if ksel:
            qg = torch.empty((cap * nh, D), device=dev, dtype=q.dtype)
            dog = torch.empty((cap * nh, D), device=dev, dtype=do.dtype)
            lg = torch.empty((cap * nh,), device=dev, dtype=torch.float32)
            dg = torch.empty((cap * nh,), device=dev, dtype=torch.float32)
            tg = torch.empty((cap,), device=dev, dtype=torch.int32)
            launch(_gather_rows_kernel, (triton.cdiv(cap, 64),),
                q, do, lse, delta, qg, dog, lg, dg, tg, lists["entries"], lists["list_ptr"],
                strides["stride_qt"], strides["stride_qh"], strides["stride_dot"], strides["stride_doh"], T, ksel,
                LIST0=hr0 * nb, LIST1=hr1 * nb, CAP=cap, G=G, GROUP=group_routing, NH=nh, D=D, BLOCK_D=BLOCK_D,
                BLOCK_E=64,
            )
            list_ptr = lists["list_ptr"]
        else:
            qg = dog = lg = dg = tg = list_ptr = delta  # unused (HAS_LISTS off)
        # [T, query heads of the chunk, D] fp32: the layout of dq, so the final copy is a plain strided one
        dq_acc = torch.zeros((T, (g1 - g0) * G, D), device=dev, dtype=torch.float32) if fused else delta
        launch(_dkdv_kernel, (nb * triton.cdiv(block_size, cfg["BLOCK_N"]), g1 - g0),
            q, k, v, do, lse, delta, dk, dv, dq_acc, qg, dog, lg, dg, tg, list_ptr,
            layout["block_start"], layout["block_len"], layout["block_first"], layout["work_order"],
            stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
            NB=nb, DENSE_BLOCKS=dense_blocks, sm_scale=softmax_scale, HKV0=g0, HC=(g1 - g0) * G, LIST0=hr0 * nb,
            CAP=cap,
            NLISTS=1 if group_routing else G, FUSED_DQ=fused, HAS_LISTS=ksel > 0, **strides, **const, **cfg,
        )
        del qg, dog, lg, dg, tg
        if fused:
            dq[:, g0 * G:g1 * G].copy_(dq_acc)
        del dq_acc
    if fused:
        return
    hr_total = HKV if group_routing else HQ
    dcfg = kernel_config("diag_dq", block_size, D, q.dtype)
    lcfg = kernel_config("list_dq", block_size, D, q.dtype)
    for h0, h1 in head_chunks(hr_total, nh * T * ksel * D * q.element_size(), budget_bytes):
        hq0, nhq = h0 * nh, (h1 - h0) * nh
        if ksel:
            dqpart = torch.empty((nhq, T, ksel, D), device=dev, dtype=q.dtype)
            bound = triton.cdiv(T * (h1 - h0) * ksel, lists["tile_m"]) + (h1 - h0) * nb
            launch(_list_dq_kernel, (bound,),
                q, k, v, do, lse, delta, dqpart, lists["entries"], lists["list_ptr"], lists["tile_list"],
                lists["tile_first"], layout["block_start"], NB=nb, LIST0=h0 * nb, LIST1=h1 * nb, HQ0=hq0,
                GROUP=group_routing, NHEADS=nh, **strides, **const, **dict(lcfg, BLOCK_M=lists["tile_m"]),
            )
        else:
            dqpart = delta  # unused
        grid = (layout["NS"] * triton.cdiv(block_size, dcfg["BLOCK_M"]), nhq)
        launch(_diag_dq_kernel, grid,
            q, k, v, do, lse, delta, dq, dqpart, sel if ksel else delta, layout["block_start"], layout["block_len"],
            layout["sparse_blocks"], stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), HQ0=hq0,
            sm_scale=softmax_scale, GROUP=group_routing, **strides, **const, **dcfg,
        )
