"""Routing statistics of MoBA: which blocks queries choose, and how much of full attention they keep.

Legend: L keys of one document, C sampled queries, H_q / H_kv heads (g = H_q / H_kv), D head dim,
N = ceil(L / block_size) blocks of the document.

For a query at position p (block ``b = p // block_size``), MoBA attends its own block causally and the
``top_k - 1`` earlier full blocks with the highest ``q . mean(k_block)`` (fp32, no scale; MoBA paper,
arXiv 2502.13189, Sec. 2.2, the semantics of ``moba_core.reference``). This module measures, per layer:

- the distance ``b - i`` of every chosen earlier block i from the query's own block (a histogram; the
  own block, distance 0, is always attended and not counted);
- how often each block position i is chosen, against how often it was a candidate;
- the attention recall: the share of full causal attention's probability mass (softmax of
  ``scale * q . k`` over keys ``<= p``) that falls on the keys MoBA attends. It is exactly 1 when
  ``top_k`` covers every earlier block, and below 1 when a block with attention mass is left out.

Plain PyTorch in fp32; queries are processed in chunks so temporaries stay (H_q, chunk, L).
"""

from __future__ import annotations

import math

import torch


def chosen_block_mask(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, block_size: int, top_k: int,
                      group_routing: bool = False) -> torch.Tensor:
    """Blocks each query attends under MoBA (its own block and its chosen earlier blocks).

    Args:
        q: (C, H_q, D) queries at ``positions`` of one document; k: (L, H_kv, D) that document's keys (after
            RoPE), any float dtype (routing runs in fp32).
        positions: int64 (C,) absolute positions of the queries, each in ``[0, L)``.
        block_size, top_k: MoBA's (``top_k`` counts the own block).
        group_routing: one choice per KV group (mean of the group's scores).

    Returns:
        bool (H_q, C, N): True for the blocks the query attends (keys of its own block only up to the query).

    Raises:
        ValueError: shapes that disagree, a position outside ``[0, L)``, ``block_size`` not a positive
            multiple of 16 or ``top_k < 1``.
    """
    L, Hkv, D = k.shape
    C, Hq = q.shape[0], q.shape[1]
    if q.dim() != 3 or q.shape[2] != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} must be (C, H_q, D) with H_q a multiple of k's {Hkv} heads and D={D}")
    if positions.shape != (C,) or (C and (int(positions.min()) < 0 or int(positions.max()) >= L)):
        raise ValueError(f"positions must be ({C},) in [0, {L}); got shape {tuple(positions.shape)}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
        raise ValueError(f"block_size={block_size!r} must be a positive multiple of 16")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    g = Hq // Hkv
    n_blocks = -(-L // block_size)
    own = positions // block_size  # (C,)
    mask = torch.zeros(Hq, C, n_blocks, dtype=torch.bool, device=q.device)
    mask[:, torch.arange(C, device=q.device), own] = True
    n_full = L // block_size
    if top_k == 1 or n_full == 0 or C == 0:
        return mask
    means = k[: n_full * block_size].float().reshape(n_full, block_size, Hkv, D).mean(1)  # (N_full, H_kv, D)
    sc = torch.einsum("chgd,nhd->hgcn", q.float().reshape(C, Hkv, g, D), means)  # (H_kv, g, C, N_full)
    if group_routing:
        sc = sc.mean(1, keepdim=True).expand(-1, g, -1, -1)
    sc = sc.reshape(Hq, C, n_full)
    cand = torch.arange(n_full, device=q.device)[None, :] < own[:, None]  # (C, N_full): blocks before its own
    sc = sc.masked_fill(~cand[None], float("-inf"))
    vals, idx = sc.topk(min(top_k - 1, n_full), dim=-1)  # (H_q, C, kk)
    chosen = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, idx, torch.isfinite(vals))
    mask[..., :n_full] |= chosen
    return mask


def attention_recall(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, block_mask: torch.Tensor,
                     block_size: int, softmax_scale: float | None = None) -> torch.Tensor:
    """Share of full causal attention's probability that falls on the keys of the attended blocks.

    Args:
        q: (C, H_q, D) at ``positions`` (int64 (C,)); k: (L, H_kv, D) of the same document.
        block_mask: bool (H_q, C, N) attended blocks (``chosen_block_mask``).
        softmax_scale: default ``1 / sqrt(D)`` (the model's attention scale).

    Returns:
        fp32 (H_q, C) recall in [0, 1] per head and query: ``sum_{j <= p, block(j) attended} softmax_j``.
    """
    L, Hkv, D = k.shape
    C, Hq = q.shape[0], q.shape[1]
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    s = torch.einsum("hgcd,hld->hgcl", q.float().reshape(C, Hkv, g, D).permute(1, 2, 0, 3),
                     k.float().permute(1, 0, 2)).reshape(Hq, C, L) * scale
    key_pos = torch.arange(L, device=q.device)
    s = s.masked_fill(key_pos[None, None, :] > positions[None, :, None], float("-inf"))  # causal
    p = torch.softmax(s, dim=-1)  # (H_q, C, L)
    keys_in = block_mask.repeat_interleave(block_size, dim=-1)[..., :L]  # (H_q, C, L)
    return (p * keys_in).sum(-1)


class RoutingStats:
    """Accumulates one layer's routing statistics over documents and sampled queries.

    ``update`` takes one document's queries and keys; ``summary`` returns plain Python numbers:
    ``recall`` (mean over sampled queries and heads), ``queries`` (query-head pairs counted),
    ``distance_hist`` (list: entry d = how many chosen earlier blocks lay d blocks before the query's own,
    d >= 1; entry 0 is 0), ``block_chosen`` / ``block_candidate`` (lists over block positions i: how often
    block i was chosen / was a candidate, i.e. a full block before the query's own) and ``block_rate``
    (chosen / candidate, None where never a candidate).
    """

    def __init__(self, block_size: int, top_k: int, group_routing: bool = False, query_chunk: int = 64):
        self.block_size, self.top_k, self.group_routing = block_size, top_k, group_routing
        self.query_chunk = query_chunk
        self.recall_sum = 0.0
        self.count = 0
        self.distance = torch.zeros(1, dtype=torch.int64)
        self.chosen = torch.zeros(0, dtype=torch.int64)
        self.candidate = torch.zeros(0, dtype=torch.int64)

    @staticmethod
    def _add(acc: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n = max(acc.numel(), counts.numel())
        out = torch.zeros(n, dtype=torch.int64)
        out[: acc.numel()] += acc
        out[: counts.numel()] += counts.cpu()
        return out

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               softmax_scale: float | None = None) -> None:
        """Add the queries ``q`` (C, H_q, D) at ``positions`` (int64 (C,)) of one document with keys
        ``k`` (L, H_kv, D). Raises ``ValueError`` as ``chosen_block_mask``."""
        Hq = q.shape[1]
        for c0 in range(0, q.shape[0], self.query_chunk):
            qc, pc = q[c0: c0 + self.query_chunk], positions[c0: c0 + self.query_chunk]
            mask = chosen_block_mask(qc, k, pc, self.block_size, self.top_k, self.group_routing)  # (H_q, C, N)
            self.recall_sum += float(attention_recall(qc, k, pc, mask, self.block_size, softmax_scale).sum())
            self.count += Hq * qc.shape[0]
            n = mask.shape[-1]
            own = pc // self.block_size
            blk = torch.arange(n, device=q.device)
            earlier = mask & (blk[None, None, :] < own[None, :, None])  # chosen earlier blocks
            self.chosen = self._add(self.chosen, earlier.sum((0, 1)))
            n_full = k.shape[0] // self.block_size
            cand = (blk[None, :] < own[:, None]) & (blk[None, :] < n_full)  # (C, N)
            self.candidate = self._add(self.candidate, cand.sum(0) * Hq)
            dist = (own[None, :, None] - blk[None, None, :]).expand_as(earlier)[earlier]
            self.distance = self._add(self.distance, torch.bincount(dist, minlength=1))

    def summary(self) -> dict:
        """The statistics as plain Python values (see the class docstring)."""
        n = max(self.chosen.numel(), self.candidate.numel())
        chosen, cand = self._add(torch.zeros(n, dtype=torch.int64), self.chosen), self._add(
            torch.zeros(n, dtype=torch.int64), self.candidate)
        return {
            "block_size": self.block_size,
            "top_k": self.top_k,
            "recall": self.recall_sum / self.count if self.count else None,
            "queries": self.count,
            "distance_hist": self.distance.tolist(),
            "block_chosen": chosen.tolist(),
            "block_candidate": cand.tolist(),
            "block_rate": [c / m if m else None for c, m in zip(chosen.tolist(), cand.tolist())],
        }
