"""MoBA routing on the GPU: block tables, block mean-pool, fused scores + top-(k-1), key-block-major lists.

Algorithm (MoBA, arXiv 2502.13189, Sec. 2.2):
    1. ``block_layout`` (host, from the document lengths): every document is cut into blocks of
       ``block_size`` tokens from its first token (only a document's last block may be short). Blocks
       whose index inside their document is below ``dense_blocks`` are *dense*: their queries have at
       most ``top_k - 1`` earlier blocks, so MoBA takes them all and the queries attend their whole causal
       prefix (the caller runs those with dense FlashAttention). The other blocks are *sparse*.
    2. ``_mean_pool_kernel``: the fp32 mean of the keys of each block, per KV head.
    3. ``_route_topk_kernel``: per tile of ``BLOCK_M`` queries of one sparse block and one routing head,
       loop over the candidate block means (the document's blocks before the query's own block) in
       chunks of ``BLOCK_N``, score with ``tl.dot`` in fp32, and keep the best ``KSEL = top_k - 1``
       (value, block) pairs per row in registers. All rows of a tile share their candidates. The
       (tokens x blocks) score matrix is never written. Rows of dense blocks keep ``-1`` (no selection).
    4. ``build_block_lists``: the key-block-major (CSR) layout. Each selection (head, query, slot) belongs
       to list ``head * NB + block``: counts, a prefix sum and an atomic scatter group them by list (a
       stable sort instead in deterministic mode). ``list_ptr`` gives each list's range, and a tile map
       (``tile_list``, ``tile_first``) lets later kernels launch over an upper bound of query tiles whose
       surplus programs exit at once.

Layouts: q (T, HQ, D), k (T, HKV, D) with any token and head strides, head dim contiguous (stride 1); block
means fp32 (HKV, NB, D) contiguous; selection int32 (HR, T, KSEL) with -1 for an empty slot; HR = HQ
(per-head routing) or HKV (group routing: the score is the mean over the G = HQ / HKV query heads of a group,
computed as the dot of the group's mean query with the block mean, which equals the mean of the scores up to rounding).

Dtypes: q, k fp32 / fp16 / bf16; routing scores accumulated in fp32 from split bf16 / tf32 tensor-core
products on GPUs (``default_route_precision``), exact "ieee" under the interpreter. Head dims up to 128
(padded to a power of two). Offsets in int64. Limits: ``T * HR * KSEL < 2**31`` (entry ids are int32).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .config import INTERPRET, kernel_config
from .launch import launch


@triton.jit(do_not_specialize=['NB'])  # layout counts: one compile for every packing
def _mean_pool_kernel(
    k_ptr, means_ptr, block_start_ptr, block_len_ptr,
    stride_kt, stride_kh,
    NB, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    hkv = tl.program_id(1).to(tl.int64)
    start = tl.load(block_start_ptr + blk)
    blen = tl.load(block_len_ptr + blk)
    offs_d = tl.arange(0, BLOCK_D)
    # [BLOCK_D]
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(0, blen, BLOCK_T):
        offs_t = n + tl.arange(0, BLOCK_T)
        ptrs = k_ptr + (start + offs_t)[:, None].to(tl.int64) * stride_kt + hkv * stride_kh + offs_d[None, :]
        # [BLOCK_T, BLOCK_D]
        kk = tl.load(ptrs, mask=(offs_t[:, None] < blen) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(kk, axis=0)
    acc = acc / tl.maximum(blen, 1).to(tl.float32)
    tl.store(means_ptr + (hkv * NB + blk) * D + offs_d, acc, mask=offs_d < D)


@triton.jit
def _pack_keys(s, cols, valid):
    """int64 keys ordered as (score, then lower block first) of fp32 scores ``s`` [BLOCK_M, BLOCK_N] of blocks
    ``cols`` [BLOCK_N]: the score's bits made order-preserving as int32 in the high half, ``2**31 - 1 - block`` in
    the low half; invalid positions get the int64 minimum + 1 (below the slots' sentinels). One max then finds
    a row's best candidate and its block together; -0.0 counts as +0.0."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 2147483647)
    key = (ordered.to(tl.int64) << 32) | (2147483647 - cols[None, :]).to(tl.int64)
    return tl.where(valid, key, -9223372036854775807)


@triton.jit(do_not_specialize=['NB'])  # layout counts: one compile for every packing
def _route_topk_kernel(
    q_ptr, means_ptr, block_start_ptr, block_len_ptr, block_first_ptr, sparse_ptr, sel_ptr,
    stride_qt, stride_qh,
    T, NB,
    G: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KSEL, KPAD: tl.constexpr, ROUTE_PREC: tl.constexpr, BLOCK_SIZE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NQT = tl.cdiv(BLOCK_SIZE, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    hr = tl.program_id(1).to(tl.int64)
    blk = tl.load(sparse_ptr + pid // NQT).to(tl.int64)
    m0 = (pid % NQT) * BLOCK_M
    blen = tl.load(block_len_ptr + blk)
    if m0 >= blen:
        return
    lo = tl.load(block_first_ptr + blk)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mrow = offs_m < blen
    t = tl.load(block_start_ptr + blk) + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, KPAD)
    # [BLOCK_M, KPAD]: running best (score, block) pairs packed into one int64 key each (``_pack_keys``): empty
    # slots hold distinct sentinels below every candidate, padding columns the int64 maximum (never replaced)
    best = tl.where(offs_k[None, :] < KSEL, -9223372036854775806 + offs_k[None, :].to(tl.int64),
                    9223372036854775807) + tl.zeros([BLOCK_M, KPAD], tl.int64)
    if GROUP:
        hkv = hr
    else:
        hkv = hr // G
    # [BLOCK_M, BLOCK_D] routing query in fp32 (group mean for group routing)
    qmask = mrow[:, None] & (offs_d[None, :] < D)
    qr = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if GROUP:
        for j in range(G):
            ptrs = q_ptr + t[:, None] * stride_qt + (hkv * G + j) * stride_qh + offs_d[None, :]
            qr += tl.load(ptrs, mask=qmask, other=0.0).to(tl.float32)
        qr = qr / G
    else:
        ptrs = q_ptr + t[:, None] * stride_qt + hr * stride_qh + offs_d[None, :]
        qr = tl.load(ptrs, mask=qmask, other=0.0).to(tl.float32)
    if ROUTE_PREC == "bf16x2" or ROUTE_PREC == "bf16x3":
        # qr = q_hi + q_lo exactly enough (16 mantissa bits); q_lo is zero for bf16 inputs ("bf16x2")
        q_hi = qr.to(tl.bfloat16)
        q_lo = (qr - q_hi.to(tl.float32)).to(tl.bfloat16)
    for n0 in range(lo, blk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mptrs = means_ptr + (hkv * NB + cols.to(tl.int64))[:, None] * D + offs_d[None, :]
        # [BLOCK_N, BLOCK_D]
        mk = tl.load(mptrs, mask=(cols[:, None] < blk) & (offs_d[None, :] < D), other=0.0)
        # [BLOCK_M, BLOCK_N]
        if ROUTE_PREC == "bf16x2" or ROUTE_PREC == "bf16x3":
            # split the fp32 means into bf16 high and low parts: 2 (3) bf16 tensor-core products with fp32
            # accumulation, about 1.5e-5 relative error, at the cost of one tf32 product
            m_hi = mk.to(tl.bfloat16)
            m_lo = (mk - m_hi.to(tl.float32)).to(tl.bfloat16)
            s = tl.dot(q_hi, tl.trans(m_lo))
            if ROUTE_PREC == "bf16x3":
                s = tl.dot(q_lo, tl.trans(m_hi), s)
            s = tl.dot(q_hi, tl.trans(m_hi), s)
        else:
            s = tl.dot(qr, tl.trans(mk), input_precision=ROUTE_PREC)
        key = _pack_keys(s, cols, (cols[None, :] < blk) & mrow[:, None])
        kmax = tl.max(key, axis=1)
        bmin = tl.min(best, axis=1)
        # insertion passes only while some row of the tile has a chunk key above its current k-th best; each pass
        # moves one candidate per row, so BLOCK_N passes bound the loop whatever the scores hold
        it = 0
        while (tl.max((kmax > bmin).to(tl.int32), axis=0) > 0) & (it < BLOCK_N):
            it += 1
            best = tl.where((kmax > bmin)[:, None] & (best == bmin[:, None]), kmax[:, None], best)
            key = tl.where(key == kmax[:, None], -9223372036854775807, key)
            kmax = tl.max(key, axis=1)
            bmin = tl.min(best, axis=1)
    # sentinels (slots no candidate filled) -> -1
    best_i = tl.where(best > -9223372036854775806 + KPAD, 2147483647 - (best & 4294967295), -1).to(tl.int32)
    sptrs = sel_ptr + (hr * T + t)[:, None] * KSEL + offs_k[None, :]
    tl.store(sptrs, best_i, mask=mrow[:, None] & (offs_k[None, :] < KSEL))


def block_layout(lens: list[int], block_size: int, dense_blocks: int, device) -> dict:
    """Block tables of a packed batch, built on the host from the document lengths (one copy to the device).

    Args:
        lens: document lengths in tokens (zero allowed), in packing order.
        block_size: keys per block. dense_blocks: leading blocks of each document that count as dense
            (``top_k`` for the dense fast path, 0 to route every block through the sparse kernels).
    Returns:
        dict with device tensors ``block_start`` int64 (NB,), ``block_len`` int32 (NB,), ``block_first``
        int32 (NB,) (first block of the block's document: a block's candidates are ``[block_first, blk)``),
        ``sparse_blocks`` int32 (NS,) ids of the sparse blocks, ``work_order`` int32 (NB,) every block id,
        the ones expected to be selected most first, and host values ``NB``, ``NS``, ``dense_segments`` (list of
        (first token, length) of each document's dense prefix, length > 0).

    ``work_order`` is the longest-first order of the backward's key-block programs (one per block, each over
    the queries that selected it): a query of local block c picks its blocks among c candidates, so block b of
    a document is expected to be picked by ``sum(1 / c for later blocks c)`` of a block's queries. In packing
    order a later document's first blocks (the longest lists) would start last and run alone at the end.
    """
    lens_np = np.asarray(lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens_np)[:-1]]) if len(lens_np) else np.zeros(0, np.int64)
    nblk = (lens_np + block_size - 1) // block_size
    first = np.concatenate([[0], np.cumsum(nblk)[:-1]]) if len(lens_np) else np.zeros(0, np.int64)
    nb = int(nblk.sum())
    doc = np.repeat(np.arange(len(lens_np)), nblk)
    local = np.arange(nb) - first[doc]
    bstart = starts[doc] + local * block_size
    blen = np.minimum(block_size, lens_np[doc] - local * block_size)
    sparse = np.nonzero(local >= dense_blocks)[0]
    # expected selections of each block: H(n - 1) - H(b) = sum of 1 / c over the later blocks c of its document
    # (harmonic numbers from one table, so equal (n, b) give equal keys in every document and ties keep block order)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(nblk.max(initial=0)), 1)))])
    order = np.argsort(-(harmonic[nblk[doc] - 1] - harmonic[local]), kind="stable")
    packed = torch.from_numpy(np.concatenate([bstart, blen, first[doc], sparse, order]).astype(np.int64)).to(device)
    dense_len = np.minimum(lens_np, dense_blocks * block_size)
    return dict(
        block_start=packed[:nb], block_len=packed[nb:2 * nb].to(torch.int32),
        block_first=packed[2 * nb:3 * nb].to(torch.int32),
        work_order=packed[-nb:].to(torch.int32) if nb else packed[:0],
        sparse_blocks=packed[3 * nb:3 * nb + sparse.size].to(torch.int32),
        NB=nb, NS=int(sparse.size),
        dense_segments=[(int(s), int(n)) for s, n in zip(starts, dense_len) if n > 0],
    )


def block_means(k: torch.Tensor, layout: dict) -> torch.Tensor:
    """fp32 (HKV, NB, D) mean of the keys of each block."""
    T, HKV, D = k.shape
    nb = layout["NB"]
    means = torch.empty((HKV, nb, D), device=k.device, dtype=torch.float32)
    if nb:
        launch(_mean_pool_kernel, (nb, HKV),
            k, means, layout["block_start"], layout["block_len"],
            stride_kt=k.stride(0), stride_kh=k.stride(1),
            NB=nb, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=64,
        )
    return means


def route_topk(q, means, layout, top_k: int, block_size: int, group_routing: bool, route_prec: str | None = None):
    """Select the ``top_k - 1`` best earlier blocks of each query of a sparse block.

    Args:
        q: (T, HQ, D); means: fp32 (HKV, NB, D) from ``block_means``; layout: from ``block_layout``.
    Returns:
        int32 (HR, T, top_k - 1) global block ids, -1 for an empty slot (fewer candidates than slots, or a
        query of a dense block).
    """
    T, HQ, D = q.shape
    HKV = means.shape[0]
    ksel = top_k - 1
    hr = HKV if group_routing else HQ
    sel = torch.full((hr, T, ksel), -1, device=q.device, dtype=torch.int32)
    if ksel == 0 or T == 0 or layout["NS"] == 0:
        return sel
    if route_prec is None:
        route_prec = os.environ.get("MOBA_ROUTE_PREC") or default_route_precision(q.dtype, group_routing)
    cfg = kernel_config("route", block_size, D, q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (layout["NS"] * triton.cdiv(block_size, bm), hr)
    launch(_route_topk_kernel, grid,
        q, means, layout["block_start"], layout["block_len"], layout["block_first"], layout["sparse_blocks"], sel,
        stride_qt=q.stride(0), stride_qh=q.stride(1), T=T, NB=layout["NB"],
        G=HQ // HKV, GROUP=group_routing, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        KSEL=ksel, KPAD=max(2, triton.next_power_of_2(ksel)), ROUTE_PREC=route_prec, BLOCK_SIZE=block_size,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return sel


def default_route_precision(dtype: torch.dtype, group_routing: bool) -> str:
    """How the routing scores (fp32 by definition) are computed on the tensor cores.

    Under the interpreter exact "ieee". On GPUs: bf16 queries against means split into bf16 high and low
    parts, "bf16x2" (2 bf16 products; the queries are exact in bf16) or, for the fp32 group-mean query of
    group routing and for fp16 inputs, "bf16x3" (query split too): ~1.5e-5 relative error in the scores, at
    the speed of one tf32 product (H200: the routing kernel took 6.1 ms with "tf32x3" and 3.7 ms with "tf32" at
    2x65536:128:8). fp32 inputs keep "tf32x3" (three tf32 products, fp32-level accuracy).
    ``MOBA_ROUTE_PREC=ieee|tf32x3|tf32|bf16x2|bf16x3`` overrides.
    """
    if INTERPRET:
        return "ieee"
    if dtype == torch.bfloat16 and not group_routing:
        return "bf16x2"
    return "tf32x3" if dtype == torch.float32 else "bf16x3"


SCATTER_MAX_ENTRIES = 1 << 22


@triton.jit(do_not_specialize=['NB'])  # layout counts: one compile for every packing
def _list_pass_kernel(sel_ptr, counts_ptr, list_ptr, entries_ptr, E, TK, NB,
                      SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    """Over selection ids ``(hr * T + t) * KSEL + slot``: count each list's entries (``SCATTER`` off), or write
    each id at ``list_ptr[list] + (atomic ticket of its list)`` (``SCATTER`` on; counts reset to zero first)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < E
    s = tl.load(sel_ptr + offs, mask=m, other=-1)
    ok = s >= 0
    key = (offs // TK) * NB + s
    ticket = tl.atomic_add(counts_ptr + key, 1, mask=ok, sem="relaxed")
    if SCATTER:
        pos = tl.load(list_ptr + key, mask=ok, other=0) + ticket
        tl.store(entries_ptr + pos, offs.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=['NL'])  # layout counts: one compile for every packing
def _list_scan_kernel(counts_ptr, list_ptr, tile_first_ptr, NL, TILE_M, BLOCK: tl.constexpr):
    """One program: exclusive prefix sums of the list sizes (``list_ptr``) and of their query tiles
    (``tile_first``), both (NL + 1,) int64."""
    run_e = tl.sum(tl.zeros([BLOCK], tl.int64), 0)
    run_t = run_e
    tl.store(list_ptr, run_e)
    tl.store(tile_first_ptr, run_t)
    for c0 in range(0, NL, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < NL
        c = tl.load(counts_ptr + offs, mask=m, other=0).to(tl.int64)
        nt = (c + TILE_M - 1) // TILE_M
        tl.store(list_ptr + offs + 1, tl.cumsum(c, 0) + run_e, mask=m)
        tl.store(tile_first_ptr + offs + 1, tl.cumsum(nt, 0) + run_t, mask=m)
        run_e += tl.sum(c, 0)
        run_t += tl.sum(nt, 0)


@triton.jit
def _tile_list_kernel(tile_first_ptr, tile_list_ptr, BLOCK: tl.constexpr):
    """Program l writes its list id into ``tile_list[tile_first[l]:tile_first[l + 1]]``."""
    lst = tl.program_id(0).to(tl.int64)
    a = tl.load(tile_first_ptr + lst)
    b = tl.load(tile_first_ptr + lst + 1)
    for j in range(a, b, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        tl.store(tile_list_ptr + offs, lst.to(tl.int32) + tl.zeros([BLOCK], tl.int32), mask=offs < b)


def build_block_lists(sel: torch.Tensor, nb: int, tile_m: int, deterministic: bool | None = None) -> dict:
    """Key-block-major lists from the selection, on the device without a host sync.

    Up to ``SCATTER_MAX_ENTRIES`` selections, without a sort: a counting pass (one atomic increment per
    selection), a one-program prefix sum over the lists, and a scatter pass in which each selection takes an
    atomic ticket in its list: 4 launches and one fill, where the sort path takes ~16 (at 8192:512:3, 0.14
    against 0.53 ms, launch-bound). The order inside a list then follows the atomics, which changes the
    summation order of dK / dV (rounding only). Above it, and under ``torch.use_deterministic_algorithms(True)``
    (or ``deterministic=True``), a stable device sort orders the entries by (list, token): the atomics of
    the scatter serialise per list, and at 14.7M selections it took 4.0 ms against the sort's 0.9 (H200).
    With the sort and ``kernels.attention_bwd.fused_dq`` off (as in deterministic mode) every kernel output
    is bitwise reproducible.

    Args:
        sel: int32 (HR, T, KSEL) from ``route_topk``; nb: number of blocks; tile_m: query tile of the
            list kernels; deterministic: None follows ``torch.are_deterministic_algorithms_enabled()``.
    Returns:
        dict with ``entries`` int32 (E,) selection ids ``(hr * T + t) * KSEL + slot`` grouped by list
        ``hr * NB + block`` (valid up to ``list_ptr[-1]``); ``list_ptr`` int64 (HR * NB + 1,) offsets of the
        lists; ``tile_list`` int32 (MAX_TILES,) list of each query tile (read only below ``tile_first[-1]``);
        ``tile_first`` int64 (HR * NB + 1,) first tile of each list (last: total tiles); ``max_tiles`` (host
        int, upper bound of the tiles of all lists); ``tile_m``.
    """
    hr, T, ksel = sel.shape
    dev = sel.device
    nl = hr * nb
    max_tiles = triton.cdiv(sel.numel(), tile_m) + nl
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic or sel.numel() > SCATTER_MAX_ENTRIES:
        heads = (torch.arange(hr, device=dev, dtype=torch.int32) * nb)[:, None, None]
        keys = torch.where(sel >= 0, sel + heads, nl).reshape(-1)
        sorted_keys, order = torch.sort(keys, stable=True)
        del keys
        entries = order.to(torch.int32)
        del order
        list_ptr = torch.searchsorted(sorted_keys, torch.arange(nl + 1, device=dev, dtype=torch.int32))
        del sorted_keys
        ntiles = (list_ptr[1:] - list_ptr[:-1] + tile_m - 1) // tile_m
        tile_first = torch.zeros(nl + 1, dtype=torch.int64, device=dev)
        torch.cumsum(ntiles, 0, out=tile_first[1:])
        tile_list = torch.searchsorted(tile_first[1:], torch.arange(max_tiles, device=dev), right=True).to(torch.int32)
        return dict(entries=entries, list_ptr=list_ptr, tile_list=tile_list, tile_first=tile_first,
                    max_tiles=max_tiles, tile_m=tile_m)
    E = sel.numel()
    # Each buffer's rows padded to a multiple of 16 bytes: its second row is then 16-byte aligned whatever nl.
    # Triton specialises pointers on that alignment and nl = HR * NB changes with the packing (unpadded, routing
    # heads HR not a multiple of 4, e.g. 14, compiled a variant per parity of NB in the middle of training).
    counts = torch.zeros(2, triton.cdiv(nl, 4) * 4, dtype=torch.int32, device=dev)  # [0]: sizes, [1]: tickets
    ptrs = torch.empty(2, triton.cdiv(nl + 1, 2) * 2, dtype=torch.int64, device=dev)[:, : nl + 1]
    # ptrs[0]: list_ptr, ptrs[1]: tile_first (both nl + 1 long)
    entries = torch.empty(E, dtype=torch.int32, device=dev)
    tile_list = torch.empty(max_tiles, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(E, 1024),)
    if E:
        launch(_list_pass_kernel, grid, sel, counts[0], ptrs[0], entries, E, T * ksel, nb, SCATTER=False, BLOCK=1024)
    launch(_list_scan_kernel, (1,), counts[0], ptrs[0], ptrs[1], nl, tile_m, BLOCK=1024)
    if E:
        launch(_list_pass_kernel, grid, sel, counts[1], ptrs[0], entries, E, T * ksel, nb, SCATTER=True, BLOCK=1024)
    if nl:
        launch(_tile_list_kernel, (nl,), ptrs[1], tile_list, BLOCK=256)
    return dict(entries=entries, list_ptr=ptrs[0], tile_list=tile_list, tile_first=ptrs[1],
                max_tiles=max_tiles, tile_m=tile_m)
