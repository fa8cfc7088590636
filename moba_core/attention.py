"""Public MoBA attention entry point: argument checks and the one backend dispatch point.

Backends:
    "reference"  dense masked attention in float32 (``moba_core.reference``), for tests.
    "flash"      the gathered varlen formulation (``moba_core.flash``): current-block causal part plus
                 selected-blocks part, merged by LSE; flash-attn / PyTorch FlashAttention on a GPU,
                 an exact PyTorch path on a CPU.
    "triton"     our Triton kernels (``moba_core.triton_backend`` -> ``kernels``), GPU (or the Triton
                 interpreter with ``TRITON_INTERPRET=1``); the queries of each document's first ``top_k``
                 blocks (plain causal attention under MoBA) run through SDPA / varlen FlashAttention.
    "auto"       "triton" on a CUDA device when Triton imports, else "flash".
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .decode import moba_attention_kv
from .layout import check_moba_args, host_cu_seqlens
from .reference import moba_attention_reference

BACKENDS = ("auto", "triton", "flash", "reference")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it runs on a CUDA device, or anywhere under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (one of ``BACKENDS``) to a concrete backend for tensors on ``device``.

    Raises:
        ValueError: unknown backend name, or "triton" on a CPU without ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "flash"
    if backend == "triton" and not (
            (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and triton_available()):
        raise ValueError(
            f"backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1); tensors are on {device}"
        )
    return backend


def _usable_scale(x) -> bool:
    """A softmax scale the kernels can take: > 0, and it and ``x * log2(e)`` normal float32 numbers (the Triton
    kernels compute in fp32, base 2)."""
    f32 = torch.finfo(torch.float32)
    try:
        x = float(x)
    except (TypeError, ValueError):
        return False
    return f32.tiny <= x <= f32.max and f32.tiny <= x * math.log2(math.e) <= f32.max


def moba_attention(
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
    backend: str = "auto",
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA (Mixture of Block Attention, arXiv 2502.13189, Sec. 2.2) over a packed varlen batch.

    Each document is cut into blocks of ``block_size`` keys. Query t attends causally inside its own
    block plus the ``top_k - 1`` earlier blocks of its document with the highest score
    ``q_t . mean(k_block)`` (float32, no scale, hard choice without gradient). The output is softmax
    attention (scale ``softmax_scale``, default ``1/sqrt(D)``) over the union of those keys.

    Args:
        q: (total_tokens, H_q, D) float32 / bfloat16 / float16.
        k, v: (total_tokens, H_kv, D), same dtype; H_q must be a multiple of H_kv (GQA; k/v are
            never expanded to H_q heads).
        cu_seqlens: int32 (num_docs + 1,) document offsets, 0 first, total_tokens last; zero-length
            documents are allowed.
        max_seqlen: the longest document, in tokens.
        block_size: keys per block, a positive multiple of 16.
        top_k: blocks per query including its current block (``top_k = 1``: current block only).
        softmax_scale: scale of ``q . k`` inside the softmax, a finite number > 0 that float32 holds, times
            log2(e) too (between 1.2e-38 and 2.3e38; the Triton kernels take the row max of the unscaled scores
            and compute in fp32).
        group_routing: route once per KV group (mean of the group's scores), so every query head of
            a group attends the same blocks; default routes per query head as the paper does.
        backend: one of ``BACKENDS``.
        cu_seqlens_k: int32 (num_docs + 1,) key offsets when documents have fewer queries than keys
            (chunked prefill, decoding with a KV cache): k, v then hold ``cu_seqlens_k[-1]`` tokens and
            the queries of a document are its last positions, routed exactly as in a full forward
            (``moba_core.decode``, exact PyTorch on every backend). None (or equal to ``cu_seqlens``):
            queries and keys are the same tokens.

    Returns:
        o: (total_tokens, H_q, D), dtype of q; differentiable in q, k and v.

    Raises:
        ValueError: naming the argument and the bad value (see ``check_moba_args`` and
            ``resolve_backend``).
    """
    if softmax_scale is not None and not _usable_scale(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a finite number > 0 that float32 holds (between "
                         f"1.2e-38 and 2.3e38), or None for 1/sqrt(D)")
    same_tokens = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens or (
        cu_seqlens_k.shape == cu_seqlens.shape and host_cu_seqlens(cu_seqlens_k) == host_cu_seqlens(cu_seqlens))
    if not same_tokens:
        check_moba_args(q, q, q, cu_seqlens, max_seqlen, block_size, top_k)  # block_size, top_k, cu_seqlens
        resolve_backend(backend, q.device)
        return moba_attention_kv(q, k, v, cu_seqlens, cu_seqlens_k, block_size, top_k, softmax_scale=softmax_scale,
                                 group_routing=group_routing)
    check_moba_args(q, k, v, cu_seqlens, max_seqlen, block_size, top_k)
    backend = resolve_backend(backend, q.device)
    kwargs = dict(softmax_scale=softmax_scale, group_routing=group_routing)
    if backend == "reference":
        return moba_attention_reference(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, **kwargs)
    if backend == "flash":
        from .flash import flash_moba_attention

        return flash_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, **kwargs)
    from .triton_backend import triton_moba_attention

    return triton_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, **kwargs)
