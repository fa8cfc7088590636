"""MoBA block-sparse attention forward for the queries of sparse blocks: one pass, no atomics.

Why key-block-major: MoBA routes per token, so the 64-128 queries of a query tile choose nearly every
earlier block between them; a query-tile-major kernel would either visit that union (about half of all
causal tiles, FlexAttention's cost) or degrade to one query per program. Turning the problem around, a
program owns one (head, key block) and a tile of the queries that chose it (gathered through the lists
of ``kernels.routing.build_block_lists``): K and V of the block stream once per tile and every
``tl.dot`` is a dense [BLOCK_M x BLOCK_N] tile.

Kernels (flash-decoding's split-and-combine, with the splits given by the routing):
    1. ``_list_fwd_kernel``: per (query, slot) the attention of the query over its selected block alone:
       a normalised partial output ``o_part`` (HC, T, KSEL, D) in the input dtype and its LSE
       ``lse_part`` fp32 (HC, T, KSEL) (base 2, of ``s * scale * log2(e)``). Each (query, slot) has one
       writer. 2 matrix products per attended (query, key) pair.
    2. ``_combine_fwd_kernel``: per tile of queries of one sparse block, the causal attention inside the
       block (an ordinary flash tile on the diagonal), merged with the KSEL partials by LSE in fp32;
       writes o and the global LSE (HQ, T). Slots the routing left empty (``sel < 0``) are skipped.
Both run per chunk of HC heads so the partial buffers stay bounded (about twice the size of q, ``partial_budget``).

Layouts: q, o (T, HQ, D); k, v (T, HKV, D); any token and head strides (int64 offsets), head dim contiguous
(stride 1: ``moba_core.triton_backend`` copies a tensor whose last stride is not 1); the list kernel reads K / V
through TMA tensor descriptors where their layout allows (``kv_descriptors``). GQA: HQ = G * HKV, k/v never
expanded; per-head routing lists are per query head, group routing lists per KV head (a program then
serves the G heads of its group from one K/V stream). Dtypes fp16 / bf16 / fp32 (fp32 dots: see
``dot_precision``). Head dim D <= 128, padded to a power of two >= 16. Selected blocks are always full
(``block_size`` keys), so only the diagonal part needs key masks. Rows of dense blocks are not written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .config import INTERPRET, kernel_config
from .launch import launch

LOG2E = 1.4426950408889634


@triton.jit
def _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, pid, T,
                 KSEL, BLOCK_M: tl.constexpr):
    """(list, row mask, token, slot) of the query tile ``pid`` of the lists."""
    lst = tl.load(tile_list_ptr + pid).to(tl.int64)
    e0 = tl.load(list_ptr + lst) + (pid - tl.load(tile_first_ptr + lst)) * BLOCK_M
    e1 = tl.load(list_ptr + lst + 1)
    offs_e = e0 + tl.arange(0, BLOCK_M)
    me = offs_e < e1
    ent = tl.load(entries_ptr + offs_e, mask=me, other=0).to(tl.int64)
    return lst, me, ent // KSEL % T, ent % KSEL


@triton.jit
def _softmax_step(q, kk, vv, m_i, l_i, acc, qk_scale, smask, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of an online softmax (flash-attention): scores of q [BLOCK_M, BLOCK_D] against kk
    [BLOCK_N, BLOCK_D] (with ``MASKED``, positions outside ``smask`` [BLOCK_M, BLOCK_N] excluded), base-2 running
    max ``m_i`` (of the scaled scores), sum ``l_i`` and fp32 accumulator ``acc`` [BLOCK_M, BLOCK_D] updated with
    vv [BLOCK_N, BLOCK_D]. The max is taken on the raw scores and scaled once per row (exact for
    ``qk_scale > 0``), and ``s * qk_scale - m`` is one FMA inside ``exp2`` (the Triton fused-attention
    tutorial's form): two fewer ALU operations per score than scaling every score first."""
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC)
    if MASKED:
        s = tl.where(smask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def partial_row(sel_ptr, hq, hkv, t, rmask, T, HQ0, KSEL, j, GROUP: tl.constexpr):
    """Row of slot ``j`` of queries ``t`` (head ``hq``) in a chunk's partial buffers, and whether the routing
    filled that slot (``sel >= 0``; rows outside ``rmask`` are never valid)."""
    if GROUP:
        hr = hkv
    else:
        hr = hq
    ok = rmask & (tl.load(sel_ptr + (hr * T + t) * KSEL + j, mask=rmask, other=-1) >= 0)
    return ((hq - HQ0) * T + t) * KSEL + j, ok


@triton.jit(do_not_specialize=['NB', 'LIST0', 'LIST1', 'HQ0'])  # layout counts and head chunks: one compile each
def _list_fwd_kernel(
    q_ptr, k_ptr, v_ptr, opart_ptr, lpart_ptr,
    entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, block_start_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    T, NB, LIST0, LIST1, HQ0, qk_scale,
    G: tl.constexpr, GROUP: tl.constexpr, NHEADS: tl.constexpr, KSEL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DESC: tl.constexpr = False,
):
    # tiles of lists [LIST0, LIST1) (one chunk of routing heads); surplus programs exit
    # with KV_DESC, k_ptr / v_ptr are TMA tensor descriptors of k / v as (T, HKV * D) (``kv_descriptors``)
    pid = tl.program_id(0).to(tl.int64) + tl.load(tile_first_ptr + LIST0)
    if pid >= tl.load(tile_first_ptr + LIST1):
        return
    lst, me, t, slot = _gather_rows(entries_ptr, list_ptr, tile_list_ptr, tile_first_ptr, pid, T, KSEL, BLOCK_M)
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
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n in range(0, BLOCK_SIZE, BLOCK_N):
            if KV_DESC:
                # [BLOCK_N, BLOCK_D]
                kk = k_ptr.load([(kstart + n).to(tl.int32), (hkv * D).to(tl.int32)])
                vv = v_ptr.load([(kstart + n).to(tl.int32), (hkv * D).to(tl.int32)])
            else:
                offs_n = (kstart + n + tl.arange(0, BLOCK_N)).to(tl.int64)
                # [BLOCK_N, BLOCK_D]
                kk = tl.load(k_ptr + offs_n[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                             mask=dmask[None, :], other=0.0)
                vv = tl.load(v_ptr + offs_n[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                             mask=dmask[None, :], other=0.0)
            # selected blocks are full and rows past the list end have q = 0 (finite scores, not stored): no mask
            m_i, l_i, acc = _softmax_step(q, kk, vv, m_i, l_i, acc, qk_scale, me[:, None], DOT_PREC, False)
        l_safe = tl.where(me, l_i, 1.0)
        row = ((hq - HQ0) * T + t) * KSEL + slot
        tl.store(lpart_ptr + row, tl.where(me, m_i, 0.0) + tl.log2(l_safe), mask=me)
        tl.store(opart_ptr + row[:, None] * D + offs_d[None, :], (acc / l_safe[:, None]).to(opart_ptr.dtype.element_ty),
                 mask=me[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=['HQ0'])  # head chunks: one compile for every chunking
def _combine_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, opart_ptr, lpart_ptr, sel_ptr,
    block_start_ptr, block_len_ptr, sparse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, HQ0, qk_scale,
    G: tl.constexpr, GROUP: tl.constexpr, KSEL, KPAD: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # KSEL stays a runtime value here: its loop is not unrolled (session 13: unrolled, the combine was 20% slower)
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
    # causal diagonal: key tiles before the query tile need no mask, the last ones do
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
        causal = (offs_n[None, :] <= offs_m[:, None]) & kmask[None, :]
        m_i, l_i, acc = _softmax_step(q, kk, vv, m_i, l_i, acc, qk_scale, causal, DOT_PREC, True)
    # rows past the block end have m_i = -inf; keep them finite (they are not stored)
    m_i = tl.where(mrow, m_i, 0.0)
    l_i = tl.where(mrow, l_i, 1.0)
    if KSEL > 0:
        # merge the KSEL partials (lse, normalised o) into the diagonal's (m_i, l_i, acc) in base 2, fp32 (a partial
        # of LSE lp stands for 2^lp of softmax mass). A row's slots are consecutive, so its routing and partial LSEs
        # come in one load each and the max over all of them is known before any partial output is read: the
        # output tiles then need no running rescale, and the next slot's tile is requested before this one is added.
        offs_k = tl.arange(0, KPAD)
        kmask = mrow[:, None] & (offs_k[None, :] < KSEL)
        if GROUP:
            hr = hkv
        else:
            hr = hq
        # [BLOCK_M, KPAD]
        ok = kmask & (tl.load(sel_ptr + (hr * T + t)[:, None] * KSEL + offs_k[None, :], mask=kmask, other=-1) >= 0)
        prow = ((hq - HQ0) * T + t) * KSEL
        lp = tl.load(lpart_ptr + prow[:, None] + offs_k[None, :], mask=ok, other=float("-inf"))
        mx = tl.maximum(m_i, tl.max(lp, axis=1))
        wa = tl.exp2(m_i - mx)
        w = tl.exp2(lp - mx[:, None])  # 0 for empty slots
        acc = acc * wa[:, None]
        l_i = l_i * wa + tl.sum(w, axis=1)
        m_i = mx
        okd = ok.to(tl.int32)
        # [BLOCK_M, BLOCK_D]
        op_next = tl.load(opart_ptr + prow[:, None] * D + offs_d[None, :],
                          mask=(tl.sum(tl.where(offs_k[None, :] == 0, okd, 0), axis=1) > 0)[:, None] & dmask[None, :],
                          other=0.0)
        for j in range(KSEL):
            op = op_next
            # slot j + 1 (none after the last: an all-false mask reads nothing)
            ok_n = tl.sum(tl.where(offs_k[None, :] == j + 1, okd, 0), axis=1) > 0
            op_next = tl.load(opart_ptr + (prow + j + 1)[:, None] * D + offs_d[None, :],
                              mask=ok_n[:, None] & dmask[None, :], other=0.0)
            wj = tl.sum(tl.where(offs_k[None, :] == j, w, 0.0), axis=1)
            acc += op.to(tl.float32) * wj[:, None]
    lse = m_i + tl.log2(l_i)
    o = acc / l_i[:, None]
    tl.store(lse_ptr + hq * T + t, lse, mask=mrow)
    tl.store(o_ptr + t[:, None] * stride_ot + hq * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mrow[:, None] & dmask[None, :])


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple | None:
    """TMA tensor descriptors of k and v (T, HKV, D) seen as (T, HKV * D) with [block_n, D] boxes, or None where
    they do not apply: ``MOBA_TMA=0``, a head dim that is not a power of two >= 16 (the box would cross into the
    next head), heads not packed (stride(1) != D), or a token stride / base not 16-byte aligned."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if os.environ.get("MOBA_TMA", "1") == "0":
        return None
    T, HKV, D = k.shape
    ok = D >= 16 and D & (D - 1) == 0 and all(
        x.stride(2) == 1 and x.stride(1) == D and (x.stride(0) * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0 for x in (k, v))
    if not ok:
        return None
    return tuple(TensorDescriptor(x, shape=[T, HKV * D], strides=[x.stride(0), 1], block_shape=[block_n, D])
                 for x in (k, v))


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of ``tl.dot`` for fp32 inputs (fp16 / bf16 ignore it): "tf32x3" on GPUs (split-tf32 on the
    tensor cores, fp32-level accuracy: ~1e-6 relative against float64 in ``train.bench_kernels``' check), exact
    "ieee" under the interpreter. With "ieee" on a GPU (FMA loops, no tensor cores) the first fp32 call of the
    kernels took 71 s, nearly all of it compilation (H200, Triton 3.6). ``MOBA_DOT_PREC`` overrides."""
    if dtype != torch.float32:
        return "tf32"
    return os.environ.get("MOBA_DOT_PREC", "ieee" if INTERPRET else "tf32x3")


def head_chunks(n_route_heads: int, per_head_bytes: int, budget_bytes: int):
    """Split routing heads into chunks whose partial buffers fit ``budget_bytes`` (at least one head each)."""
    hc = max(1, min(n_route_heads, budget_bytes // max(per_head_bytes, 1)))
    return [(h, min(h + hc, n_route_heads)) for h in range(0, n_route_heads, hc)]


def moba_fwd(q, k, v, layout: dict, sel: torch.Tensor, lists: dict | None, top_k: int, block_size: int,
             softmax_scale: float, group_routing: bool, o: torch.Tensor, budget_bytes: int):
    """Forward of MoBA attention for the queries of sparse blocks, given the routing.

    Args:
        q: (T, HQ, D); k, v: (T, HKV, D); layout: ``routing.block_layout``; sel: ``routing.route_topk``;
        lists: ``routing.build_block_lists`` (None when ``top_k == 1``); o: (T, HQ, D) output buffer
        whose rows of sparse blocks are written; budget_bytes: bound of the partial buffers.
    Returns:
        lse fp32 (HQ, T) (base 2, of ``s * softmax_scale * log2(e)``), set on the rows of sparse blocks.
    """
    T, HQ, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    ksel = top_k - 1
    nb = layout["NB"]
    qk_scale = softmax_scale * LOG2E
    dev = q.device
    lse = torch.empty((HQ, T), device=dev, dtype=torch.float32)
    if layout["NS"] == 0:
        return lse
    strides = dict(stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                   stride_vt=v.stride(0), stride_vh=v.stride(1))
    const = dict(T=T, qk_scale=qk_scale, G=G, GROUP=group_routing, KSEL=ksel, D=D,
                 BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size, DOT_PREC=dot_precision(q.dtype))
    nh = G if group_routing else 1  # query heads per routing head
    hr_total = HKV if group_routing else HQ
    chunks = head_chunks(hr_total, nh * T * ksel * D * q.element_size(), budget_bytes)
    ccfg = kernel_config("combine_fwd", block_size, D, q.dtype)
    lcfg = kernel_config("list_fwd", block_size, D, q.dtype)
    for h0, h1 in chunks:
        hq0, nhq = h0 * nh, (h1 - h0) * nh
        if ksel:
            opart = torch.empty((nhq, T, ksel, D), device=dev, dtype=q.dtype)
            lpart = torch.empty((nhq, T, ksel), device=dev, dtype=torch.float32)
            assert lists["tile_m"] == lcfg["BLOCK_M"]
            bound = triton.cdiv(T * (h1 - h0) * ksel, lists["tile_m"]) + (h1 - h0) * nb
            descs = kv_descriptors(k, v, lcfg["BLOCK_N"])
            launch(_list_fwd_kernel, (bound,),
                q, *(descs or (k, v)), opart, lpart, lists["entries"], lists["list_ptr"], lists["tile_list"],
                lists["tile_first"], layout["block_start"], NB=nb, LIST0=h0 * nb, LIST1=h1 * nb, HQ0=hq0, NHEADS=nh,
                KV_DESC=descs is not None, **strides, **const, **lcfg,
            )
        else:
            opart = lpart = lse  # unused
        grid = (layout["NS"] * triton.cdiv(block_size, ccfg["BLOCK_M"]), nhq)
        launch(_combine_fwd_kernel, grid,
            q, k, v, o, lse, opart, lpart, sel if ksel else lse, layout["block_start"], layout["block_len"],
            layout["sparse_blocks"],
            stride_ot=o.stride(0), stride_oh=o.stride(1), HQ0=hq0, KPAD=max(2, triton.next_power_of_2(ksel)),
            **strides, **const, **ccfg,
        )
    return lse
