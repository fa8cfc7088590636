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
    ``CudnnVarlen``  ``FlashVarlen`` whose long causal self-attention sequences run through cuDNN's fused
                     attention instead (Hopper and newer: faster than FlashAttention-2, which PyTorch ships).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .layout import host_cu_seqlens


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


class _RunInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


def run_in_backward(fn, device: torch.device) -> None:
    """Call ``fn()`` from inside a backward pass of a tensor on ``device``: where the autograd engine runs the
    backward of training's tensors (on CUDA a thread of its own per device, not the caller's). What ``fn``
    raises is raised here, as it is."""
    raised = []

    def call():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            raised.append(err)

    x = torch.zeros((), device=device, requires_grad=True)
    with torch.enable_grad():
        _RunInBackward.apply(x, call).backward()
    if raised:
        raise raised[0]


class CudnnVarlen:
    """``FlashVarlen`` (``short``) with cuDNN's fused attention for the long sequences of causal self-attention
    calls (the contract of this module: same shapes and LSE layout).

    Measured on an H200 at the 1B model's shape (32 query / 8 KV heads, D 64, bf16; BENCHMARKS.md): cuDNN's
    fwd+bwd is 1.19x FlashAttention-2's at 4K tokens and 1.40-1.45x from 8K to 128K (580 against 829 ms).
    cuDNN runs one dense sequence per call (``torch.ops.aten._scaled_dot_product_cudnn_attention`` on
    (1, H, L, D) views, K/V heads repeated for GQA) and builds a plan per new length (~0.1 s, kept for the
    process), so a sequence is padded to ``padded_len`` (a bounded number of plan lengths) and goes to cuDNN
    when it has at least ``min_seqlen`` tokens and the padding adds at most 1/16 of its rows. A packed batch is
    cut into those sequences, one cuDNN call each, and the runs of other sequences between them, one ``short``
    varlen call each (views, no gather). Calls that are not causal self-attention (``cu_q is not cu_k``: MoBA's
    selected blocks) and batches without such a sequence go to ``short`` unchanged. A cuDNN error (an
    unsupported shape) warns once and sends everything to ``short`` for the rest of the process; running out of
    memory is raised as it is (a caller that catches it, as ``train.bench_kernels`` does per cell, keeps cuDNN).
    ``MOBA_CUDNN_ATTENTION=0`` turns cuDNN off; ``MOBA_CUDNN_MIN_SEQLEN`` sets ``min_seqlen`` (``cudnn_env``).
    """

    def __init__(self, min_seqlen: int = 4096, short: "FlashVarlen | TorchVarlen | None" = None,
                 min_step: int = 512):
        self.min_seqlen, self.min_step = min_seqlen, min_step
        self.short = short if short is not None else FlashVarlen()
        self.failed = False

    def use_cudnn(self, n: int) -> bool:
        """Whether a causal sequence of ``n`` tokens goes to cuDNN."""
        return n >= self.min_seqlen and self.padded_len(n, self.min_step) - n <= n // 16

    def _plan(self, cu_q, cu_k, max_q, causal):
        """(host offsets, [(use_cudnn, first seq, end seq)]) or None when cuDNN has nothing to do. Reads the
        offsets on the host (``host_cu_seqlens``: once per tensor) only when ``max_q`` allows a long sequence."""
        if self.failed or not causal or cu_q is not cu_k or cu_q.numel() < 2 or max_q < self.min_seqlen:
            return None
        if torch.are_deterministic_algorithms_enabled():  # cuDNN's backward is not documented as deterministic
            return None
        b = host_cu_seqlens(cu_q)
        long_seq = [self.use_cudnn(e - s) for s, e in zip(b[:-1], b[1:])]
        if not any(long_seq):
            return None
        plan, i = [], 0
        while i < len(long_seq):
            j = i + 1
            if not long_seq[i]:
                while j < len(long_seq) and not long_seq[j]:
                    j += 1
            if b[j] > b[i]:
                plan.append((long_seq[i], i, j))
            i = j
        return b, plan

    @staticmethod
    def padded_len(n: int, min_step: int = 512) -> int:
        """``n`` rounded up to a multiple of 2^(floor(log2 n) - 5), at least ``min_step``: at most 32 lengths per
        doubling, so cuDNN builds a bounded number of plans however the documents vary, for at most 1/32 more
        rows where the step is not the minimum."""
        step = max(min_step, 1 << max(0, n.bit_length() - 6))
        return -(-n // step) * step

    def plan_lengths(self, max_len: int) -> list[int]:
        """Every padded length (``padded_len``) at which a causal sequence of at most ``max_len`` tokens runs
        through cuDNN (``use_cudnn``), ascending: the plans a run at ``max_len`` tokens per document can need
        (57 at 32K tokens, 121 at 128K with the defaults)."""
        out, n = [], self.min_seqlen
        while n <= max_len:
            p = self.padded_len(n, self.min_step)
            m = min(p, max_len)  # the longest length below max_len that pads to p: the least padding
            if self.use_cudnn(m) and self.padded_len(m, self.min_step) == p:
                out.append(p)
            n = p + 1
        return out

    def warmup(self, max_len: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
               scale: float, progress=None) -> list[int]:
        """Build cuDNN's forward and backward plans for every length of ``plan_lengths(max_len)`` now, with one
        causal fwd+bwd of random (L, heads, head_dim) tensors each (``heads``: the query heads of one call; K/V
        are repeated to them anyway). cuDNN builds a plan on first use of a shape (~0.07 s forward, ~0.07 s
        backward on an H200) and keeps it for the process, so without this the training steps that meet a new
        document length stall, and in a multi-rank run every rank waits at the next collective. PyTorch keeps
        these plans per thread (``thread_local`` caches in ATen's cudnn/MHA.cpp) and the autograd engine runs a
        CUDA backward on a thread of its own, so the forward is built here and the backward (with the forward
        again, for activation checkpointing's recompute) inside a backward pass (``run_in_backward``).

        Args:
            progress: optional callable ``progress(done, total, length)`` after each length.
        Returns:
            the lengths built; fewer when cuDNN fails (``_fallback``: warned, FlashAttention from then on) or
            memory runs out (a warning; the remaining plans are built lazily as before).
        """
        lengths = [] if self.failed else self.plan_lengths(max_len)
        built = []
        for i, L in enumerate(lengths):
            try:
                q, k, v, do = (torch.randn(L, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
                self.cudnn_fwd(q, k, v, scale)  # this thread's forward plan: the training forward, evaluation
                # the backward's plan, and the forward's again for what activation checkpointing recomputes there
                run_in_backward(functools.partial(self._fwd_bwd, q, k, v, do, scale), device)
            except torch.OutOfMemoryError:
                warnings.warn(f"cuDNN plan warm-up stopped at {L} tokens: out of memory (the other plans are "
                              "built when first needed)", RuntimeWarning, stacklevel=2)
                break
            except RuntimeError as err:
                self._fallback(err)
                break
            finally:
                q = k = v = do = None
            built.append(L)
            if progress is not None:
                progress(i + 1, len(lengths), L)
        return built

    def _fwd_bwd(self, q, k, v, do, scale):
        o, lse = self.cudnn_fwd(q, k, v, scale)
        self.cudnn_bwd(do, q, k, v, o, lse, scale)

    @staticmethod
    def sdpa_fwd(q, k, v, scale):
        """cuDNN on (1, H, L, D): -> (o (1, H, L, D), lse (1, H, L, 1) fp32)."""
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        return out[0], out[1]

    @staticmethod
    def sdpa_bwd(do, q, k, v, o, lse, scale):
        """The backward of ``sdpa_fwd`` on (1, H, L, D) tensors -> (dq, dk, dv)."""
        L = q.shape[2]
        unused = torch.empty((), dtype=torch.int64, device=q.device)  # philox seed / offset: no dropout
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse, unused, unused, None, None, None, L, L, 0.0, True, scale=scale
        )

    @classmethod
    def _prepare(cls, min_step, q, *rows):
        """Pads (L, H, D) rows with zero rows to ``padded_len`` and returns (1, H, Lp, D) views, K/V heads
        repeated to q's (GQA). Zero query rows after the document are harmless both ways: causal masking keeps
        them from the document's queries, and in the backward their dO, O and LSE are 0, so (q = 0 making every
        score 0) their P is 1 and dS = P (dP - rowsum(dO O)) = 0."""
        L, Hq, _ = q.shape
        pad = cls.padded_len(L, min_step) - L
        out = []
        for x in (q, *rows):
            x = x.contiguous()
            if x.dim() == 3 and x.shape[1] != Hq:
                x = x.repeat_interleave(Hq // x.shape[1], 1)
            if pad:
                x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)) if x.dim() == 3 else \
                    torch.nn.functional.pad(x, (0, pad))
            out.append(x.unsqueeze(0).transpose(1, 2) if x.dim() == 3 else x[None, :, :, None])
        return out

    def cudnn_fwd(self, q, k, v, scale):
        """One causal sequence: q (L, H_q, D), k, v (L, H_kv, D) -> (o (L, H_q, D), lse (H_q, L) fp32)."""
        L = q.shape[0]
        o, lse = self.sdpa_fwd(*self._prepare(self.min_step, q, k, v), scale)
        return o[0, :, :L].transpose(0, 1), lse[0, :, :L, 0]

    def cudnn_bwd(self, do, q, k, v, o, lse, scale):
        """The backward of ``cudnn_fwd`` for one sequence given its (merged) o and lse -> (dq, dk, dv)."""
        L, Hq, D = q.shape
        Hkv = k.shape[1]
        q4, k4, v4, do4, o4, lse4 = self._prepare(self.min_step, q, k, v, do.to(q.dtype), o.to(q.dtype), lse.float())
        grads = [x[0, :, :L].transpose(0, 1) for x in self.sdpa_bwd(do4, q4, k4, v4, o4, lse4.contiguous(), scale)]
        if Hq != Hkv:
            grads[1:] = [x.reshape(L, Hkv, Hq // Hkv, D).sum(2) for x in grads[1:]]
        return tuple(grads)

    def _fallback(self, err: Exception):
        self.failed = True
        warnings.warn(f"cuDNN attention failed ({err}); using FlashAttention for the rest of this process "
                      "(MOBA_CUDNN_ATTENTION=0 silences this)", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _segments(cu_q, b, parts):
        """(long, start row, end row, local cu_seqlens, max_seqlen) of each part of a plan; the last two only for
        the runs of short sequences (None for a long one)."""
        for long_seq, i, j in parts:
            if long_seq:
                yield True, b[i], b[j], None, None
            else:
                yield False, b[i], b[j], cu_q[i: j + 1] - b[i], max(b[n + 1] - b[n] for n in range(i, j))

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        plan = self._plan(cu_q, cu_k, max_q, causal)
        if plan is None:
            return self.short.fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        o = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        try:
            for long_seq, s, e, cu, m in self._segments(cu_q, *plan):
                if long_seq:
                    o[s:e], lse[:, s:e] = self.cudnn_fwd(q[s:e], k[s:e], v[s:e], scale)
                else:
                    o[s:e], lse[:, s:e] = self.short.fwd(q[s:e], k[s:e], v[s:e], cu, cu, m, m, True, scale)
        except torch.OutOfMemoryError:
            raise  # not a cuDNN limitation: falling back would turn cuDNN off for the rest of the process
        except RuntimeError as err:
            self._fallback(err)
            return self.short.fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        return o, lse

    def bwd(self, do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        plan = self._plan(cu_q, cu_k, max_q, causal)
        if plan is None:
            return self.short.bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        try:
            for long_seq, s, e, cu, m in self._segments(cu_q, *plan):
                rows = (do[s:e], q[s:e], k[s:e], v[s:e], o[s:e], lse[:, s:e].contiguous())
                if long_seq:
                    dq[s:e], dk[s:e], dv[s:e] = self.cudnn_bwd(*rows, scale)
                else:
                    dq[s:e], dk[s:e], dv[s:e] = self.short.bwd(*rows, cu, cu, m, m, True, scale)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            self._fallback(err)
            return self.short.bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale)
        return dq, dk, dv


def cudnn_env() -> tuple[bool, int]:
    """(``MOBA_CUDNN_ATTENTION`` on, ``MOBA_CUDNN_MIN_SEQLEN``) from the environment: on unless 0 / false / off /
    no; the minimum length a positive integer, 4096 when unset.

    Raises:
        ValueError: naming the variable and its value when it is neither.
    """
    flag = os.environ.get("MOBA_CUDNN_ATTENTION", "1").strip().lower()
    if flag not in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        raise ValueError(f"MOBA_CUDNN_ATTENTION={flag!r} must be 1/true/on/yes or 0/false/off/no")
    raw = os.environ.get("MOBA_CUDNN_MIN_SEQLEN", "4096")
    try:
        min_seqlen = int(raw)
    except ValueError:
        min_seqlen = 0
    if min_seqlen < 1:
        raise ValueError(f"MOBA_CUDNN_MIN_SEQLEN={raw!r} must be a positive number of tokens")
    return flag in ("1", "true", "on", "yes"), min_seqlen


def cudnn_attention_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``CudnnVarlen`` is used: CUDA on Hopper or newer, fp16 / bf16, head dim 64 or 128 (where it was
    measured: faster than FlashAttention-2 at 64, PyTorch's own SDPA choice at 128), cuDNN present, and
    ``MOBA_CUDNN_ATTENTION`` not off (``cudnn_env``, whose errors it raises)."""
    if not cudnn_env()[0] or device.type != "cuda":
        return False
    if dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return False
    if not torch.backends.cudnn.is_available() or not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def varlen_primitives(device: torch.device, dtype: torch.dtype, head_dim: int):
    """The fastest exact primitive pair for tensors of this device / dtype / head dim (one stateless object per
    combination: every layer call asks, and ``FlashVarlen`` tries to import flash-attn when built):
    ``CudnnVarlen`` where ``cudnn_attention_usable``, else ``FlashVarlen`` on CUDA fp16 / bf16, else
    ``TorchVarlen``."""
    if cudnn_attention_usable(device, dtype, head_dim):
        return CudnnVarlen(cudnn_env()[1])
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        return FlashVarlen()
    return TorchVarlen()
