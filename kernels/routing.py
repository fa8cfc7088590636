"""MoBA routing on the GPU: block layout, block mean-pool, fused scores + top-(k-1), key-block-major lists.

Algorithm (MoBA, arXiv 2502.13189, Sec. 2.2):
    1. ``block_layout``: every document of ``cu_seqlens`` is cut into blocks of ``block_size`` tokens from
       its first token (only a document's last block may be short). Built with torch ops over an upper
       bound of blocks ``NB = T // block_size + num_docs`` so no value is read back to the host.
    2. ``_mean_pool_kernel``: the fp32 mean of the keys of each block, per KV head.
    3. ``_route_topk_kernel``: per tile of ``BLOCK_M`` queries and one routing head, loop over the block
       means in chunks of ``BLOCK_N``, score with ``tl.dot`` (fp32 operands), mask non-candidates (blocks
       of another document, or not ending before the query's own block), and keep the best ``KSEL =
       top_k - 1`` (value, block) pairs per row in registers (replace-the-minimum insertion, ``KSEL``
       passes per chunk). The (tokens x blocks) score matrix is never written.
    4. ``build_block_lists``: the key-block-major (CSR) layout. Each selection (head, query, slot) gets
       the key ``head * NB + block``; a stable device sort orders them by list and, inside a list, by
       query. ``list_ptr`` (searchsorted on the sorted keys) gives each list's range, and a tile map
       (``tile_list``, ``tile_first``) lets later kernels launch over an upper bound of query tiles
       whose surplus programs exit at once. No host sync anywhere.

Layouts: q (T, HQ, D), k (T, HKV, D) with any strides; block means fp32 (HKV, NB, D) contiguous;
selection int32 (HR, T, KSEL) with -1 for an empty slot; HR = HQ (per-head routing) or HKV (group
routing: the score is the mean over the G = HQ / HKV query heads of a group, computed as the dot of the
group's mean query with the block mean, which equals the mean of the scores up to rounding).

Dtypes: q, k fp32 / fp16 / bf16; routing math in fp32 (``ROUTE_PREC`` "tf32x3" on GPUs: split-tf32 with
fp32-level accuracy at tensor-core speed, 2x faster than "ieee" at 128K; "ieee" under the interpreter).
Head dims up to 128 (padded to a power of two). Offsets in int64.
Limits: ``T * HR * KSEL < 2**31`` (entry ids are int32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _prune(configs, named_args, **kwargs):
    """Keep one config under the interpreter (tuning there only costs time)."""
    return configs[:1] if INTERPRET else configs


_ROUTE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)]
]


@triton.jit
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


@triton.autotune(configs=_ROUTE_CONFIGS, key=["T_BUCKET", "D", "KSEL"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _route_topk_kernel(
    q_ptr, means_ptr, cand_lo_ptr, tok_blk_ptr, sel_ptr,
    stride_qt, stride_qh,
    T, NB, T_BUCKET,
    G: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KSEL: tl.constexpr, KPAD: tl.constexpr, ROUTE_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    hr = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m < T
    lo = tl.load(cand_lo_ptr + offs_m, mask=mrow, other=0)
    hi = tl.load(tok_blk_ptr + offs_m, mask=mrow, other=0)
    has = mrow & (hi > lo)
    lo_min = tl.min(tl.where(has, lo, NB), axis=0)
    hi_max = tl.max(tl.where(has, hi, 0), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, KPAD)
    # [BLOCK_M, KPAD]: running best scores (padding columns +inf so they are never replaced) and blocks
    best_v = tl.where(offs_k[None, :] < KSEL, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KPAD], tl.float32)
    best_i = tl.full([BLOCK_M, KPAD], -1, tl.int32)
    if lo_min < hi_max:
        if GROUP:
            hkv = hr
        else:
            hkv = hr // G
        # [BLOCK_M, BLOCK_D] routing query in fp32 (group mean for group routing)
        qmask = mrow[:, None] & (offs_d[None, :] < D)
        qr = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if GROUP:
            for j in range(G):
                ptrs = q_ptr + offs_m[:, None] * stride_qt + (hkv * G + j) * stride_qh + offs_d[None, :]
                qr += tl.load(ptrs, mask=qmask, other=0.0).to(tl.float32)
            qr = qr / G
        else:
            ptrs = q_ptr + offs_m[:, None] * stride_qt + hr * stride_qh + offs_d[None, :]
            qr = tl.load(ptrs, mask=qmask, other=0.0).to(tl.float32)
        for n0 in range(lo_min, hi_max, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mptrs = means_ptr + (hkv * NB + cols.to(tl.int64))[:, None] * D + offs_d[None, :]
            # [BLOCK_N, BLOCK_D]
            mk = tl.load(mptrs, mask=(cols[:, None] < NB) & (offs_d[None, :] < D), other=0.0)
            # [BLOCK_M, BLOCK_N]
            s = tl.dot(qr, tl.trans(mk), input_precision=ROUTE_PREC)
            cand = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            s = tl.where(cand, s, float("-inf"))
            cmax = tl.max(s, axis=1)
            cur_min = tl.min(best_v, axis=1)
            # insertion passes only while some row of the tile has a chunk score above its current k-th best
            while tl.max((cmax > cur_min).to(tl.int32), axis=0) > 0:
                cidx = tl.min(tl.where(s == cmax[:, None], cols[None, :], 2147483647), axis=1)
                pos = tl.min(tl.where(best_v == cur_min[:, None], offs_k[None, :], KPAD), axis=1)
                put = (cmax > cur_min)[:, None] & (offs_k[None, :] == pos[:, None])
                best_v = tl.where(put, cmax[:, None], best_v)
                best_i = tl.where(put, cidx[:, None], best_i)
                s = tl.where(cols[None, :] == cidx[:, None], float("-inf"), s)
                cmax = tl.max(s, axis=1)
                cur_min = tl.min(best_v, axis=1)
    sptrs = sel_ptr + (hr * T + offs_m)[:, None] * KSEL + offs_k[None, :]
    tl.store(sptrs, best_i, mask=mrow[:, None] & (offs_k[None, :] < KSEL))


def block_layout(cu_seqlens: torch.Tensor, total_tokens: int, block_size: int) -> dict:
    """Per-block and per-token block tables over the upper bound ``NB = T // block_size + num_docs``.

    Returns a dict of device tensors: ``block_start`` int64 (NB,), ``block_len`` int32 (NB,) (0 for the
    unused tail of the bound), ``tok_blk`` int32 (T,) global block of each token, ``cand_lo`` int32 (T,)
    first block of the token's document (candidates are ``[cand_lo, tok_blk)``), and ``NB`` (host int).
    """
    dev = cu_seqlens.device
    num_docs = cu_seqlens.numel() - 1
    nb = total_tokens // block_size + num_docs
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    doc_off = torch.zeros(num_docs + 1, dtype=torch.int64, device=dev)
    doc_off[1:] = torch.cumsum((lens + block_size - 1) // block_size, 0)
    b = torch.arange(nb, device=dev)
    bdoc = torch.searchsorted(doc_off[1:], b, right=True).clamp_(max=num_docs - 1)
    bstart = cu[bdoc] + (b - doc_off[bdoc]) * block_size
    bend = torch.minimum(bstart + block_size, cu[bdoc + 1])
    valid = b < doc_off[-1]
    block_len = torch.where(valid, bend - bstart, 0).to(torch.int32)
    block_start = torch.where(valid, bstart, 0)
    t = torch.arange(total_tokens, device=dev)
    tdoc = torch.searchsorted(cu[1:], t, right=True).clamp_(max=num_docs - 1)
    cand_lo = doc_off[tdoc]
    tok_blk = cand_lo + (t - cu[tdoc]) // block_size
    return dict(
        block_start=block_start, block_len=block_len, tok_blk=tok_blk.to(torch.int32),
        cand_lo=cand_lo.to(torch.int32), NB=nb,
    )


def block_means(k: torch.Tensor, layout: dict) -> torch.Tensor:
    """fp32 (HKV, NB, D) mean of the keys of each block (zeros for unused blocks of the bound)."""
    T, HKV, D = k.shape
    nb = layout["NB"]
    means = torch.empty((HKV, nb, D), device=k.device, dtype=torch.float32)
    _mean_pool_kernel[(nb, HKV)](
        k, means, layout["block_start"], layout["block_len"],
        stride_kt=k.stride(0), stride_kh=k.stride(1),
        NB=nb, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=64,
    )
    return means


def route_topk(q, means, layout, top_k: int, group_routing: bool, route_prec: str | None = None):
    """Select each query's ``top_k - 1`` best earlier blocks of its document.

    Args:
        q: (T, HQ, D); means: fp32 (HKV, NB, D) from ``block_means``; layout: from ``block_layout``.
    Returns:
        int32 (HR, T, top_k - 1) global block ids, -1 for an empty slot (fewer candidates than slots).
    """
    T, HQ, D = q.shape
    HKV = means.shape[0]
    ksel = top_k - 1
    hr = HKV if group_routing else HQ
    sel = torch.empty((hr, T, ksel), device=q.device, dtype=torch.int32)
    if ksel == 0 or T == 0:
        return sel
    if route_prec is None:
        # "tf32x3" (split-tf32, three tensor-core passes: fp32-level accuracy) on GPUs, exact "ieee" under
        # the interpreter; MOBA_ROUTE_PREC=ieee|tf32x3|tf32 overrides
        route_prec = os.environ.get("MOBA_ROUTE_PREC", "ieee" if INTERPRET else "tf32x3")
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), hr)
    _route_topk_kernel[grid](
        q, means, layout["cand_lo"], layout["tok_blk"], sel,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        T=T, NB=layout["NB"], T_BUCKET=triton.next_power_of_2(T),
        G=HQ // HKV, GROUP=group_routing, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        KSEL=ksel, KPAD=max(2, triton.next_power_of_2(ksel)), ROUTE_PREC=route_prec,
    )
    return sel


def build_block_lists(sel: torch.Tensor, nb: int, tile_m: int) -> dict:
    """Key-block-major lists from the selection, on the device without a host sync.

    Args:
        sel: int32 (HR, T, KSEL) from ``route_topk``; nb: block bound; tile_m: query tile of the list kernels.
    Returns:
        dict with ``entries`` int32 (E,) selection ids ``(hr * T + t) * KSEL + slot`` sorted by
        (hr, block, t); ``list_ptr`` int64 (HR * NB + 1,) offsets of list ``hr * NB + block``;
        ``tile_list`` int32 (MAX_TILES,) list of each query tile (>= HR * NB: an empty program);
        ``tile_first`` int64 (HR * NB,) first tile of each list; ``max_tiles`` (host int).
    """
    hr, T, ksel = sel.shape
    dev = sel.device
    nl = hr * nb
    heads = (torch.arange(hr, device=dev, dtype=torch.int32) * nb)[:, None, None]
    keys = torch.where(sel >= 0, sel + heads, nl).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    entries = order.to(torch.int32)
    del order
    list_ptr = torch.searchsorted(sorted_keys, torch.arange(nl + 1, device=dev, dtype=torch.int32))
    del sorted_keys
    ntiles = (list_ptr[1:] - list_ptr[:-1] + tile_m - 1) // tile_m
    tile_end = torch.cumsum(ntiles, 0)
    max_tiles = triton.cdiv(sel.numel(), tile_m) + nl
    tile_list = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev), right=True).to(torch.int32)
    return dict(entries=entries, list_ptr=list_ptr, tile_list=tile_list, tile_first=tile_end - ntiles,
                max_tiles=max_tiles, tile_m=tile_m)
