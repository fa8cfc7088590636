"""MoBA routing in PyTorch: block mean-pooling, scores and top-(k-1) choice of earlier blocks.

Legend: T tokens, H_q / H_kv heads, D head dim, N blocks of the packed batch, S = top_k - 1 slots.

Source: MoBA paper (arXiv 2502.13189) Sec. 2.2, eq. 4-6: the score of block i for query t is
``q_t . mean(K[block i])`` (fp32, no scale); a query's own block is always attended and only blocks
that end before it are candidates.  Scores are computed in chunks of queries so that the (T x N)
score matrix never exists in full.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout


def block_means(k: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Mean of each block's keys in float32: (N, H_kv, D). Partial (last) blocks are averaged over their
    own length; they are never candidates, so their value does not matter for routing."""
    T, Hkv, D = k.shape
    idx = layout.block_start[:, None] + torch.arange(block_size, device=k.device)[None, :]  # (N, B)
    valid = torch.arange(block_size, device=k.device)[None, :] < layout.block_len[:, None]
    gathered = k.float()[idx.clamp_max(max(T - 1, 0))]  # (N, B, H_kv, D)
    gathered = gathered * valid[:, :, None, None]
    return gathered.sum(1) / layout.block_len.clamp_min(1)[:, None, None].float()


@torch.no_grad()
def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout,
    block_size: int,
    top_k: int,
    group_routing: bool = False,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Choose each query's ``top_k - 1`` earlier blocks.

    Args:
        q: (T, H_q, D); k: (T, H_kv, D).
        layout: ``block_layout(cu_seqlens, block_size)``.
        group_routing: one choice per KV head from the mean of its query heads' scores.
        chunk_tokens: queries scored at once (bounds the temporary to chunk x H_q x blocks before the chunk).

    Returns:
        int64 (T, H_q, S) global block ids with S = top_k - 1; -1 marks an empty slot (fewer
        candidates than S). Every id is a full block of the query's own document that ends before
        the query's block.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    S = top_k - 1
    out = torch.full((T, Hq, S), -1, dtype=torch.int64, device=q.device)
    M = layout.max_blocks_per_doc
    if S == 0 or M <= 1 or T == 0:
        return out
    means = block_means(k, layout, block_size)  # (N, H_kv, D)
    kk = min(S, M - 1)
    for s in range(0, T, chunk_tokens):
        e = min(T, s + chunk_tokens)
        own = layout.token_block[s:e]  # (C,) the query's own block (global id)
        first = layout.doc_block_offset[layout.token_doc[s:e]]  # (C,) its document's first block
        lo, hi = int(first[0]), int(own[-1])  # candidates of the whole chunk lie in [lo, hi)
        if hi <= lo:
            continue
        ids = torch.arange(lo, hi, device=q.device)  # (n,)
        valid = (ids[None, :] >= first[:, None]) & (ids[None, :] < own[:, None])  # (C, n)
        qc = q[s:e].float().reshape(e - s, Hkv, g, D)
        scores = torch.einsum("chgd,nhd->chgn", qc, means[lo:hi])  # (C, H_kv, g, n)
        if group_routing:
            scores = scores.mean(2, keepdim=True).expand(-1, -1, g, -1)
        scores = scores.reshape(e - s, Hq, hi - lo).masked_fill(~valid[:, None, :], float("-inf"))
        vals, idx = scores.topk(min(kk, hi - lo), dim=-1)  # (C, H_q, kk)
        chosen = torch.where(torch.isfinite(vals), idx + lo, torch.full_like(idx, -1))
        out[s:e, :, : chosen.shape[-1]] = chosen
    return out
