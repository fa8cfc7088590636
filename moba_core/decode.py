"""MoBA when queries are fewer than keys: chunked prefill and decoding with a KV cache.

Legend: per document i, ``Lk`` keys (the cache plus the new tokens) and ``Lq <= Lk`` queries, which are the
document's last ``Lq`` positions: query j sits at absolute position ``p = Lk - Lq + j`` and routes exactly as
position p does in a full forward (MoBA paper, arXiv 2502.13189, Sec. 2.2): blocks are counted from the
document's first token; its own block ``p // block_size`` is attended causally (keys up to p); the
candidates are the blocks that end before its own block, scored by ``q . mean(k_block)`` in fp32; the best
``top_k - 1`` are attended in full. Greedy generation with a cache therefore equals recomputing the
sequence without one.

This path is plain PyTorch in fp32 (exact on any device, O(Lq x Lk) scores per head, queries taken in
chunks): decoding reads each key once per step, as full-attention decoding does. Block means of a growing
cache can be passed in (``block_means``) so a decoder keeps them incrementally (``BlockMeansCache``).
"""

from __future__ import annotations

import math

import torch


def check_kv_args(q, k, v, cu_q, cu_k) -> list[tuple[int, int, int, int]]:
    """Validate a queries-shorter-than-keys call; returns per document (q start, Lq, k start, Lk).

    Raises:
        ValueError: naming the argument: shapes, dtypes, head counts, ``cu_seqlens`` / ``cu_seqlens_k`` not
            int32 1-D of the same length starting at 0 and ending at the token counts, or a document with more
            queries than keys.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q must be (Tq, H_q, D) and k, v (Tk, H_kv, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: head dims must match and H_q be a multiple "
                         "of H_kv")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, cu, total in (("cu_seqlens", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if not torch.is_tensor(cu) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor with at least 2 entries")
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c[:-1], c[1:])):
            raise ValueError(f"{name}={c} must be non-decreasing from 0 to {total}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens ({cu_q.numel()} entries) and cu_seqlens_k ({cu_k.numel()}) must describe the "
                         "same documents")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    docs = []
    for i in range(len(cq) - 1):
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if lq > lk:
            raise ValueError(f"document {i} has {lq} queries but only {lk} keys; queries are the last positions of "
                             "their document, so Lq <= Lk")
        docs.append((cq[i], lq, ck[i], lk))
    return docs


def full_block_means(k_doc: torch.Tensor, block_size: int, first: int = 0) -> torch.Tensor:
    """fp32 (N, H_kv, D) means of the full blocks ``first, first+1, ...`` of one document's keys (Lk, H_kv, D)."""
    n = k_doc.shape[0] // block_size
    if n <= first:
        return k_doc.new_zeros((0, *k_doc.shape[1:]), dtype=torch.float32)
    sel = k_doc[first * block_size: n * block_size].float()
    return sel.reshape(n - first, block_size, *k_doc.shape[1:]).mean(1)


def moba_attention_kv(q, k, v, cu_seqlens, cu_seqlens_k, block_size: int, top_k: int, *, softmax_scale=None,
                      group_routing: bool = False, full: bool = False, block_means=None, query_chunk: int = 256):
    """MoBA (or, with ``full=True``, causal attention) for queries that are the last positions of their documents.

    Args:
        q: (Tq, H_q, D); k, v: (Tk, H_kv, D); fp32 / bf16 / fp16, GQA without expanding k, v.
        cu_seqlens: int32 (docs + 1,) query offsets; cu_seqlens_k: int32 (docs + 1,) key offsets.
        block_size, top_k: MoBA's (``top_k`` counts the own block).
        softmax_scale: default ``1 / sqrt(D)``. group_routing: one choice per KV group (mean of its scores).
        full: plain causal attention over the document's keys (``moba.decode=full``).
        block_means: optional list (one per document) of fp32 (N_i, H_kv, D) means of the document's first
            N_i full blocks (at least every candidate block); computed here when None.
        query_chunk: queries scored at once (bounds the (H_q, chunk, Lk) temporaries).

    Returns:
        o: (Tq, H_q, D) in q's dtype. Differentiable in q, k, v (plain autograd; routing has no gradient).

    Raises:
        ValueError: see ``check_kv_args``, or ``block_means`` with too few blocks.
    """
    docs = check_kv_args(q, k, v, cu_seqlens, cu_seqlens_k)
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = q.new_zeros(q.shape)
    for i, (qs, lq, ks, lk) in enumerate(docs):
        if lq == 0:
            continue
        kd, vd = k[ks: ks + lk].float(), v[ks: ks + lk].float()
        kh = kd.permute(1, 0, 2)  # (H_kv, Lk, D)
        vh = vd.permute(1, 0, 2)
        key_pos = torch.arange(lk, device=q.device)
        key_blk = key_pos // block_size
        means = None
        if not full and top_k > 1:
            n_cand = (lk - 1) // block_size  # blocks before the last query's own block
            means = block_means[i] if block_means is not None else full_block_means(k[ks: ks + lk], block_size)
            if means.shape[0] < n_cand:
                raise ValueError(f"block_means[{i}] holds {means.shape[0]} blocks; document {i} needs {n_cand}")
            means = means[:n_cand]
        for c0 in range(0, lq, query_chunk):
            c1 = min(lq, c0 + query_chunk)
            pos = torch.arange(lk - lq + c0, lk - lq + c1, device=q.device)  # (C,) absolute positions
            qc = q[qs + c0: qs + c1].float().permute(1, 0, 2).reshape(Hkv, g, c1 - c0, D)
            allowed = key_pos[None, :] <= pos[:, None]  # (C, Lk) causal
            if full:
                allowed = allowed.expand(Hq, -1, -1)  # (H_q, C, Lk)
            else:
                own = pos // block_size
                allowed = allowed & (key_blk[None, :] == own[:, None])
                allowed = allowed.expand(Hq, -1, -1).clone()  # (H_q, C, Lk)
                if means is not None and means.shape[0]:
                    sc = torch.einsum("hgcd,nhd->hgcn", qc, means)  # (H_kv, g, C, N) fp32, no scale
                    if group_routing:
                        sc = sc.mean(1, keepdim=True).expand(-1, g, -1, -1)
                    sc = sc.reshape(Hq, c1 - c0, -1)
                    cand = torch.arange(sc.shape[-1], device=q.device)[None, :] < own[:, None]  # (C, N)
                    sc = sc.masked_fill(~cand[None], float("-inf"))
                    kk = min(top_k - 1, sc.shape[-1])
                    vals, idx = sc.topk(kk, dim=-1)  # (H_q, C, kk)
                    chosen = torch.zeros(sc.shape, dtype=torch.bool, device=q.device)
                    chosen.scatter_(-1, idx, torch.isfinite(vals))
                    n = sc.shape[-1]
                    blk_chosen = torch.zeros(Hq, c1 - c0, lk, dtype=torch.bool, device=q.device)
                    blk_chosen[..., : n * block_size] = chosen.repeat_interleave(block_size, dim=-1)
                    allowed = allowed | blk_chosen
            s = torch.einsum("hgcd,hkd->hgck", qc, kh) * scale
            s = s.masked_fill(~allowed.reshape(Hkv, g, c1 - c0, lk), float("-inf"))
            p = torch.softmax(s, dim=-1)
            oc = torch.einsum("hgck,hkd->hgcd", p, vh).reshape(Hq, c1 - c0, D).permute(1, 0, 2)
            out[qs + c0: qs + c1] = oc.to(q.dtype)
    return out


class BlockMeansCache:
    """Per-document means of the full key blocks of a growing KV cache, kept incrementally.

    ``get(k_docs)`` takes the documents' current keys (a list of (Lk_i, H_kv, D) tensors, each the previous
    call's keys plus new tokens) and returns their full-block means (fp32 (N_i, H_kv, D) each), pooling only
    blocks that completed since the last call. The cache restarts (pools everything) whenever the documents
    do not continue the previous ones: another count, a shorter document, or a different first key.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.means: list[torch.Tensor] = []
        self.first_keys: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def _continues(self, k_docs) -> bool:
        if len(k_docs) != len(self.means):
            return False
        for kd, fk, n in zip(k_docs, self.first_keys, self.lengths):
            if kd.shape[0] < n or kd.shape[0] == 0 or not torch.equal(kd[0], fk):
                return False
        return True

    def get(self, k_docs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._continues(k_docs):
            self.means = [full_block_means(kd, self.block_size) for kd in k_docs]
        else:
            self.means = [torch.cat([m, full_block_means(kd, self.block_size, first=m.shape[0])])
                          for m, kd in zip(self.means, k_docs)]
        self.first_keys = [kd[0].clone() if kd.shape[0] else kd.new_zeros(kd.shape[1:]) for kd in k_docs]
        self.lengths = [kd.shape[0] for kd in k_docs]
        return self.means
