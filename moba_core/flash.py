"""The ``flash`` backend: MoBA as two varlen attentions merged by LSE (the reference code's formulation).

Legend: T tokens, H_q / H_kv heads, g = H_q / H_kv, D head dim, N blocks, B block_size, E selected
(query, head, block) entries (at most T x H_q x (top_k - 1)).

Forward (MoBA paper, arXiv 2502.13189, Alg. 1):
  1. routing (``moba_core.routing``): each (query, head) gets up to ``top_k - 1`` earlier blocks;
  2. part A, the current block: every block is its own varlen sequence, causal, GQA native;
  3. part B, the selected blocks: entries are grouped by (KV head, block), the "MoE trick": each group is
     one varlen sequence with one head whose queries are the (token, query head) rows of that KV head
     that chose the block, and whose keys are the block's B keys, non-causal. Only one copy of K/V per
     KV head is gathered (N x B x H_kv, about the size of K): k/v are never expanded to H_q heads;
  4. merge in fp32: ``lse = logaddexp(lse_A, logsumexp_j lse_Bj)``, ``o = sum exp(lse_p - lse) o_p``.
Backward: each part's varlen backward is called with the merged O and LSE, which gives the exact
gradient of the single softmax over the union (dS = P o (dP - rowsum(dO o O)) with global P, O).

The varlen primitives come from ``moba_core.varlen`` (FlashAttention on CUDA fp16/bf16, exact PyTorch
elsewhere). This backend syncs with the host a few times per call (block counts, group sizes); the
``triton`` backend does not.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, block_layout
from .routing import select_blocks
from .varlen import varlen_primitives


def _selected_entries(sel: torch.Tensor, layout: BlockLayout, Hkv: int, block_size: int):
    """Group the selected (token, query head, block) entries by (KV head, block).

    Returns (rows, cu_q, max_q, k_rows, cu_k): ``rows`` int64 (E,) flat ``token * H_q + head`` indices
    sorted by group; ``cu_q`` int32 (Hkv*N + 1,) group offsets into them; ``k_rows`` int64 (Hkv*N*B,)
    flat ``token * H_kv + kv_head`` key rows of each group's block; ``cu_k`` int32 group key offsets.
    """
    T, Hq, S = sel.shape
    g = Hq // Hkv
    N = layout.num_blocks
    device = sel.device
    flat = sel.reshape(-1)
    keep = flat >= 0
    entry = torch.nonzero(keep).squeeze(1)  # index into (T, H_q, S)
    blk = flat[entry]
    token = entry // (Hq * S)
    head = (entry // S) % Hq
    group = (head // g) * N + blk
    order = torch.argsort(group, stable=True)
    rows = (token * Hq + head)[order]
    counts = torch.bincount(group, minlength=Hkv * N)
    cu_q = torch.zeros(Hkv * N + 1, dtype=torch.int32, device=device)
    cu_q[1:] = torch.cumsum(counts, 0)
    max_q = int(counts.max()) if counts.numel() else 0
    # Key rows: group (h, n) holds block n's B tokens of KV head h (partial blocks are never chosen;
    # their rows are clamped and the group has no queries).
    tok = (layout.block_start[:, None] + torch.arange(block_size, device=device)[None, :]).clamp_max(T - 1)
    k_rows = (tok[None, :, :] * Hkv + torch.arange(Hkv, device=device)[:, None, None]).reshape(-1)
    cu_k = torch.arange(Hkv * N + 1, device=device, dtype=torch.int32) * block_size
    return rows, cu_q, max_q, k_rows, cu_k


# Rows of the selected-blocks part per varlen call: keeps row x head_dim offsets far inside int32 (a single
# flash-attention backward call over all 23M rows of 128K:4096:12 hit an illegal memory access).
MAX_ROWS_PER_CALL = 1 << 22


def _row_chunks(cu_q: torch.Tensor, n_rows: int):
    """Split the grouped rows into ranges of at most ``MAX_ROWS_PER_CALL``; yields (r0, r1, cu_q clipped to
    the range). A group cut in two is fine: its queries are independent (non-causal, same keys)."""
    limit = MAX_ROWS_PER_CALL
    for r0 in range(0, n_rows, limit):
        r1 = min(n_rows, r0 + limit)
        yield r0, r1, (cu_q.clamp(r0, r1) - r0).to(torch.int32)


def _merge(o_a, lse_a, o_b, lse_b, rows, T, Hq):
    """LSE merge of part A (o_a (T,H_q,D), lse_a (H_q,T)) and part B entries (o_b (E,D), lse_b (E,)) in
    fp32. Part A always holds the query's own key, so lse_a is finite and no row can give NaN."""
    lse_a = lse_a.t().reshape(-1).float()  # (T*H_q,)
    m = lse_a.clone()
    m.scatter_reduce_(0, rows, lse_b, reduce="amax")
    w_b = torch.exp(lse_b - m[rows])
    total = torch.exp(lse_a - m).index_add_(0, rows, w_b)
    lse = m + torch.log(total)
    D = o_a.shape[-1]
    o = o_a.float().reshape(-1, D) * torch.exp(lse_a - lse)[:, None]
    o.index_add_(0, rows, o_b.float() * torch.exp(lse_b - lse[rows])[:, None])
    return o.reshape(T, Hq, D), lse.reshape(T, Hq).t().contiguous()


class _FlashMoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, sel, block_size, scale):
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        prims = varlen_primitives(q.device, q.dtype, D)
        bmax = min(block_size, int(layout.block_len.max())) if layout.num_blocks else 0
        o_a, lse_a = prims.fwd(q, k, v, layout.cu_blocks, layout.cu_blocks, bmax, bmax, True, scale)
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        rows, cu_q, max_q, k_rows, cu_k = empty, empty, 0, empty, empty
        if sel.numel():
            rows, cu_q, max_q, k_rows, cu_k = _selected_entries(sel, layout, Hkv, block_size)
        if rows.numel():
            kb = k.reshape(T * Hkv, 1, D)[k_rows]
            vb = v.reshape(T * Hkv, 1, D)[k_rows]
            parts = [
                prims.fwd(q.reshape(T * Hq, 1, D)[rows[r0:r1]], kb, vb, cu, cu_k, min(max_q, r1 - r0), block_size,
                          False, scale)
                for r0, r1, cu in _row_chunks(cu_q, rows.numel())
            ]
            o_b = torch.cat([p[0].reshape(-1, D) for p in parts])
            lse_b = torch.cat([p[1].reshape(-1) for p in parts])
            o, lse = _merge(o_a, lse_a, o_b, lse_b, rows, T, Hq)
        else:
            o, lse = o_a.float(), lse_a.float()
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, rows, cu_q, k_rows, cu_k)
        ctx.layout, ctx.block_size, ctx.scale, ctx.max_q, ctx.bmax = layout, block_size, scale, max_q, bmax
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, rows, cu_q, k_rows, cu_k = ctx.saved_tensors
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        layout, bmax, scale = ctx.layout, ctx.bmax, ctx.scale
        prims = varlen_primitives(q.device, q.dtype, D)
        dq, dk, dv = prims.bwd(do, q, k, v, o, lse, layout.cu_blocks, layout.cu_blocks, bmax, bmax, True, scale)
        dq, dk, dv = dq.float(), dk.float(), dv.float()
        if rows.numel():
            kb = k.reshape(T * Hkv, 1, D)[k_rows]
            vb = v.reshape(T * Hkv, 1, D)[k_rows]
            lse_rows = lse.t().reshape(-1)
            dkb = torch.zeros(kb.shape, dtype=torch.float32, device=kb.device)
            dvb = torch.zeros(vb.shape, dtype=torch.float32, device=vb.device)
            for r0, r1, cu in _row_chunks(cu_q, rows.numel()):
                r = rows[r0:r1]
                dqb, dkc, dvc = prims.bwd(
                    do.reshape(T * Hq, 1, D)[r], q.reshape(T * Hq, 1, D)[r], kb, vb, o.reshape(T * Hq, 1, D)[r],
                    lse_rows[r].reshape(1, -1).contiguous(), cu, cu_k, min(ctx.max_q, r1 - r0), ctx.block_size,
                    False, scale,
                )
                dq.reshape(T * Hq, D).index_add_(0, r, dqb.reshape(-1, D).float())
                dkb += dkc.float()
                dvb += dvc.float()
            dk.reshape(T * Hkv, D).index_add_(0, k_rows, dkb.reshape(-1, D))
            dv.reshape(T * Hkv, D).index_add_(0, k_rows, dvb.reshape(-1, D))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_size: int,
    top_k: int,
    *,
    softmax_scale: float | None = None,
    group_routing: bool = False,
) -> torch.Tensor:
    """MoBA through varlen attention primitives (see the module docstring). Arguments, shapes and
    errors as ``moba_core.moba_attention``; the arguments are assumed checked by it."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    layout = block_layout(cu_seqlens, block_size)
    sel = select_blocks(q, k, layout, block_size, top_k, group_routing)
    return _FlashMoBA.apply(q, k, v, layout, sel, block_size, scale)


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Full causal attention inside each document of a packed batch (the layers MoBA leaves full).

    q: (T, H_q, D); k, v: (T, H_kv, D); cu_seqlens int32 (num_docs + 1,). Returns (T, H_q, D) in q's
    dtype, differentiable. Every document is one "block" of the same machinery, so GQA stays native.
    On a CPU this is the exact PyTorch path with O(T x max_seqlen) memory per head.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    layout = BlockLayout(
        cu_blocks=cu_seqlens[torch.cat([cu_seqlens.new_ones(1, dtype=torch.bool), lens > 0])],
        block_start=cu_seqlens[:-1].to(torch.int64)[lens > 0],
        block_len=lens[lens > 0],
        doc_block_offset=torch.empty(0),
        token_block=torch.empty(0),
        token_doc=torch.empty(0),
        max_blocks_per_doc=1,
    )
    sel = torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.int64, device=q.device)
    return _FlashMoBA.apply(q, k, v, layout, sel, max(max_seqlen, 1), scale)
