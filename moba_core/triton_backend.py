"""The Triton backend of ``moba_attention``: routing + block-sparse attention kernels from ``kernels``.

Routing (block mean-pool, fp32 scores, top-(k-1), key-block-major lists) runs once in the forward and
its lists are reused by the backward; the gate gets no gradient (MoBA, arXiv 2502.13189, Sec. 2.2).
Head dims above 128 fall back to the ``flash`` backend.
"""

from __future__ import annotations

import math
import os

import torch

from kernels.attention_bwd import moba_bwd
from kernels.attention_fwd import moba_fwd
from kernels.routing import block_layout, block_means, build_block_lists, route_topk

MAX_HEAD_DIM = 128
LIST_TILE_M = int(os.environ.get("MOBA_LIST_TILE_M", "64"))  # queries per program of the list kernels


def moba_routing(q, k, cu_seqlens, block_size: int, top_k: int, group_routing: bool):
    """Routing tables for the kernels: (layout, lists or None when ``top_k == 1``). No host sync."""
    layout = block_layout(cu_seqlens, q.shape[0], block_size)
    if top_k == 1:
        return layout, None
    means = block_means(k, layout)
    sel = route_topk(q, means, layout, top_k, group_routing)
    del means
    return layout, build_block_lists(sel, layout["NB"], LIST_TILE_M)


class _TritonMoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, block_size, top_k, scale, group_routing):
        layout, lists = moba_routing(q, k, cu_seqlens, block_size, top_k, group_routing)
        o, lse = moba_fwd(q, k, v, layout, lists, top_k, block_size, scale, group_routing)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.tables = (layout, lists)
        ctx.args = (top_k, block_size, scale, group_routing)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        layout, lists = ctx.tables
        top_k, block_size, scale, group_routing = ctx.args
        dq, dk, dv = moba_bwd(do, q, k, v, o, lse, layout, lists, top_k, block_size, scale, group_routing)
        return dq, dk, dv, None, None, None, None, None


def triton_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, *, softmax_scale=None,
                          group_routing=False):
    """MoBA attention with the Triton kernels (arguments as ``moba_core.moba_attention``, already checked).

    Args:
        q: (T, HQ, D); k, v: (T, HKV, D); fp16 / bf16 / fp32; any strides. cu_seqlens int32 (docs + 1,).
    Returns:
        o: (T, HQ, D) in q's dtype, differentiable in q, k, v.
    Head dims above 128 run the ``flash`` backend instead (same semantics).
    """
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        from .flash import flash_moba_attention

        return flash_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k,
                                    softmax_scale=softmax_scale, group_routing=group_routing)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum())
    return _TritonMoBA.apply(q, k, v, cu_seqlens, block_size, top_k, scale, group_routing)
