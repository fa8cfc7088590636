"""Dense reference MoBA: masked softmax attention in float32, one document at a time.

Written for clarity, not speed: every document builds its (H_q, L, L) mask from the definition in the
MoBA paper (arXiv 2502.13189, Sec. 2.2, eq. 3-6) and the semantics in DESIGN.md. Tests compare every
efficient backend against it. It shares no routing code with the backends on purpose.
"""

from __future__ import annotations

import math

import torch

from .layout import check_moba_args


def _doc_selection_mask(q_d, k_d, block_size: int, top_k: int, group_routing: bool) -> torch.Tensor:
    """Boolean (H_q, L, L) mask of the keys each query of one document attends under MoBA.

    q_d: (L, H_q, D), k_d: (L, H_kv, D), any float dtype; routing is done in float32.
    """
    L, Hq, D = q_d.shape
    Hkv = k_d.shape[1]
    g = Hq // Hkv
    pos = torch.arange(L, device=q_d.device)
    blk = pos // block_size
    causal = pos[None, :] <= pos[:, None]  # (L, L)
    same_block = blk[None, :] == blk[:, None]
    mask = (causal & same_block).expand(Hq, L, L).clone()
    n_full = L // block_size
    n_hist = top_k - 1
    if n_hist == 0 or n_full == 0:
        return mask
    # Block representatives: the mean of each full block's keys (post-RoPE), float32.
    means = k_d[: n_full * block_size].float().reshape(n_full, block_size, Hkv, D).mean(1)  # (N, H_kv, D)
    means_q = means.repeat_interleave(g, dim=1)  # (N, H_q, D): a tiny tensor, fine in the reference
    scores = torch.einsum("lhd,nhd->hln", q_d.float(), means_q)  # (H_q, L, N)
    if group_routing:
        scores = scores.reshape(Hkv, g, L, n_full).mean(1).repeat_interleave(g, dim=0)
    # Candidates: blocks that end before the query's own block starts.
    cand = torch.arange(n_full, device=q_d.device)[None, :] < blk[:, None]  # (L, N)
    scores = scores.masked_fill(~cand, float("-inf"))
    kk = min(n_hist, n_full)
    vals, idx = scores.topk(kk, dim=-1)  # (H_q, L, kk)
    chosen = torch.zeros(Hq, L, n_full, dtype=torch.bool, device=q_d.device)
    chosen.scatter_(-1, idx, torch.isfinite(vals))
    # Expand block choice to key positions (only full blocks can be chosen).
    key_chosen = torch.zeros(Hq, L, L, dtype=torch.bool, device=q_d.device)
    key_chosen[:, :, : n_full * block_size] = chosen.repeat_interleave(block_size, dim=-1)
    return mask | (key_chosen & causal)


def moba_attention_reference(
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
    backend: str = "reference",
) -> torch.Tensor:
    """MoBA attention computed densely in float32 (for tests; O(L^2) memory per document).

    Args:
        q: (total_tokens, H_q, D); k, v: (total_tokens, H_kv, D) with H_q a multiple of H_kv.
        cu_seqlens: int32 (num_docs + 1,) document offsets; documents never attend to each other.
        max_seqlen: longest document (tokens).
        block_size: keys per block (positive multiple of 16).
        top_k: blocks per query counting its own (current) block; ``top_k - 1`` earlier blocks are
            chosen by the score ``q . mean(k_block)`` (fp32, no scale).
        softmax_scale: defaults to ``1/sqrt(D)``.
        group_routing: route once per KV group (mean of the group's scores) instead of per query head.
        backend: accepted for signature compatibility with ``moba_attention``; must be "reference".

    Returns:
        o: (total_tokens, H_q, D) in q's dtype. Differentiable in q, k, v (through plain autograd).

    Raises:
        ValueError: see ``check_moba_args``.
    """
    check_moba_args(q, k, v, cu_seqlens, max_seqlen, block_size, top_k)
    if backend != "reference":
        raise ValueError(f"moba_attention_reference only runs backend='reference'; got {backend!r}")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    outs = []
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        q_d, k_d, v_d = q[s:e], k[s:e], v[s:e]
        L = e - s
        with torch.no_grad():
            mask = _doc_selection_mask(q_d, k_d, block_size, top_k, group_routing)  # (H_q, L, L)
        qf = q_d.float().permute(1, 0, 2).reshape(Hkv, g, L, D)
        kf = k_d.float().permute(1, 0, 2).unsqueeze(1)  # (H_kv, 1, L, D)
        vf = v_d.float().permute(1, 0, 2).unsqueeze(1)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (H_kv, g, L, L)
        scores = scores.masked_fill(~mask.reshape(Hkv, g, L, L), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        o_d = torch.matmul(p, vf).reshape(Hq, L, D).permute(1, 0, 2)
        outs.append(o_d)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0).to(q.dtype)
