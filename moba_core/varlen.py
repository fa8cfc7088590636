"""Varlen attention primitives with an explicit LSE, forward and backward, for the ``flash`` backend.

Legend: Tq / Tk query / key tokens of a packed batch, H_q / H_kv heads, D head dim.

Every primitive pair has the flash-attention contract:
    fwd(q (Tq,H_q,D), k (Tk,H_kv,D), v, cu_q, cu_k, max_q, max_k, causal, scale) -> (o (Tq,H_q,D), lse (H_q,Tq) fp32)
    bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)
``causal`` aligns the mask bottom-right (key j of a sequence is visible to query i when
``j <= i + len_k - len_q``), as flash-attention does. The backward takes ``o`` and ``lse`` from the
caller, so a caller that merges several partial attentions can pass the merged O and LSE and get the
exact gradient of the merged attention (flash-attention's identity dS = P o (dP - rowsum(dO o O))).

Implementations:
    ``TorchVarlen``  exact float32 PyTorch on any device: sequences are cut into tiles of at most
                     ``tile_q`` queries, padded, and computed with batched matmuls. Memory is
                     O(Tq x H_q x max_k): meant for short key sequences (blocks), as MoBA uses it.
    ``FlashVarlen``  PyTorch's FlashAttention-2 (``torch.ops.aten._flash_attention_forward/_backward``)
                     or the flash-attn package, on CUDA, fp16/bf16.
"""

from __future__ import annotations

import functools

import torch


class TorchVarlen:
    """Exact varlen attention with LSE in float32 PyTorch (CPU or GPU)."""

    def __init__(self, tile_q: int = 64):
        self.tile_q = tile_q

    def _tiles(self, cu_q, cu_k, max_k, device):
        """Index tensors of the padded tiles: query rows (n, C), key rows (n, Kmax), masks, offsets."""
        cq = cu_q.to(torch.int64)
        ck = cu_k.to(torch.int64)
        len_q = cq[1:] - cq[:-1]
        n_tiles_seq = (len_q + self.tile_q - 1) // self.tile_q
        seq = torch.repeat_interleave(torch.arange(len_q.numel(), device=device), n_tiles_seq)
        first_tile = torch.cumsum(n_tiles_seq, 0) - n_tiles_seq
        tile_in_seq = torch.arange(seq.numel(), device=device) - first_tile[seq]
        rq = tile_in_seq[:, None] * self.tile_q + torch.arange(self.tile_q, device=device)[None, :]
        q_ok = rq < len_q[seq][:, None]  # (n, C)
        q_idx = (cq[seq][:, None] + rq).masked_fill(~q_ok, 0)
        rk = torch.arange(max_k, device=device)[None, :]
        len_k = (ck[1:] - ck[:-1])[seq]
        k_ok = rk < len_k[:, None]  # (n, Kmax)
        k_idx = (ck[seq][:, None] + rk).masked_fill(~k_ok, 0)
        # Query local row rq sees key local row rk when rk <= rq + len_k - len_q (bottom-right causal).
        shift = (len_k - len_q[seq])[:, None, None]
        causal_ok = rk[:, None, :] <= rq[:, :, None] + shift  # (n, C, Kmax)
        return q_idx, q_ok, k_idx, k_ok, causal_ok

    def _scores(self, q, k, cu_q, cu_k, max_k, causal, scale):
        Hq, D = q.shape[1], q.shape[2]
        Hkv = k.shape[1]
        g = Hq // Hkv
        q_idx, q_ok, k_idx, k_ok, causal_ok = self._tiles(cu_q, cu_k, max_k, q.device)
        n, C = q_idx.shape
        qt = q.float()[q_idx].reshape(n, C, Hkv, g, D)  # (n, C, H_kv, g, D)
        kt = k.float()[k_idx]  # (n, K, H_kv, D)
        s = torch.einsum("nchgd,nkhd->nhgck", qt, kt) * scale  # (n, H_kv, g, C, K)
        mask = k_ok[:, None, None, None, :] & q_ok[:, None, None, :, None]
        if causal:
            mask = mask & causal_ok[:, None, None]
        s = s.masked_fill(~mask, float("-inf"))
        return s, mask, q_idx, q_ok, k_idx, k_ok

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        Tq, Hq, D = q.shape
        if Tq == 0 or cu_q.numel() < 2:
            return q.new_zeros(q.shape, dtype=torch.float32), q.new_full((Hq, Tq), float("-inf"), dtype=torch.float32)
        s, mask, q_idx, q_ok, k_idx, _ = self._scores(q, k, cu_q, cu_k, max_k, causal, scale)
        lse = torch.logsumexp(s, dim=-1)  # (n, H_kv, g, C); -inf for rows without keys
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        vt = v.float()[k_idx]  # (n, K, H_kv, D)
        o_t = torch.einsum("nhgck,nkhd->nchgd", p, vt).reshape(q_idx.shape[0], q_idx.shape[1], Hq, D)
        flat = q_idx[q_ok]
        o = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
        o[flat] = o_t[q_ok]
        lse_t = lse.permute(0, 3, 1, 2).reshape(q_idx.shape[0], q_idx.shape[1], Hq)  # (n, C, H_q)
        lse_out = torch.full((Tq, Hq), float("-inf"), dtype=torch.float32, device=q.device)
        lse_out[flat] = lse_t[q_ok]
        return o, lse_out.t().contiguous()

    def bwd(self, do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        Tq, Hq, D = q.shape
        Tk, Hkv, _ = k.shape
        g = Hq // Hkv
        dq = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
        dk = torch.zeros(Tk, Hkv, D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(Tk, Hkv, D, dtype=torch.float32, device=q.device)
        if Tq == 0 or cu_q.numel() < 2:
            return dq, dk, dv
        s, mask, q_idx, q_ok, k_idx, k_ok = self._scores(q, k, cu_q, cu_k, max_k, causal, scale)
        n, C = q_idx.shape
        lse_t = lse.t()[q_idx].reshape(n, C, Hkv, g).permute(0, 2, 3, 1)  # (n, H_kv, g, C)
        lse_t = torch.where(torch.isfinite(lse_t), lse_t, torch.zeros_like(lse_t))
        p = torch.exp(s - lse_t[..., None]).masked_fill(~mask, 0.0)  # (n, H_kv, g, C, K)
        do_t = (do.float()[q_idx] * q_ok[:, :, None, None]).reshape(n, C, Hkv, g, D)
        o_t = o.float()[q_idx].reshape(n, C, Hkv, g, D)
        delta = (do_t * o_t).sum(-1).permute(0, 2, 3, 1)  # (n, H_kv, g, C)
        vt = v.float()[k_idx]
        kt = k.float()[k_idx]
        qt = q.float()[q_idx].reshape(n, C, Hkv, g, D)
        dp = torch.einsum("nchgd,nkhd->nhgck", do_t, vt)
        ds = p * (dp - delta[..., None]) * scale
        dq_t = torch.einsum("nhgck,nkhd->nchgd", ds, kt).reshape(n, C, Hq, D)
        dk_t = torch.einsum("nhgck,nchgd->nkhd", ds, qt)
        dv_t = torch.einsum("nhgck,nchgd->nkhd", p, do_t)
        dq.index_put_((q_idx[q_ok],), dq_t[q_ok], accumulate=True)
        dk.index_put_((k_idx[k_ok],), dk_t[k_ok], accumulate=True)
        dv.index_put_((k_idx[k_ok],), dv_t[k_ok], accumulate=True)
        return dq, dk, dv


class FlashVarlen:
    """FlashAttention-2 varlen through PyTorch's own aten ops (CUDA; fp16/bf16; head dim <= 256).

    Uses ``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward`` (present since
    torch 2.3); when the ``flash_attn`` package is importable its varlen kernels are used instead.
    """

    def __init__(self):
        try:
            from flash_attn import flash_attn_interface as fai  # type: ignore

            self._fa = fai
        except ImportError:
            self._fa = None

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        if self._fa is not None:
            out = self._fa._flash_attn_varlen_forward(
                q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal=causal,
                window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                return_softmax=False,
            )
            return out[0], out[1]
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
        )
        return out[0], out[1]

    def bwd(self, do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        do = do.to(q.dtype).contiguous()
        o = o.to(q.dtype).contiguous()
        lse = lse.contiguous()
        if self._fa is not None:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            self._fa._flash_attn_varlen_backward(
                do, q, k, v, o, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
                -1, -1, 0.0, None, False,
            )
            return dq, dk, dv
        empty = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, empty, empty, scale=scale
        )
        return dq, dk, dv


@functools.lru_cache(maxsize=None)
def varlen_primitives(device: torch.device, dtype: torch.dtype, head_dim: int):
    """The fastest exact primitive pair for tensors of this device / dtype / head dim (one stateless object per
    combination: every layer call asks, and ``FlashVarlen`` tries to import flash-attn when built)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        return FlashVarlen()
    return TorchVarlen()
