"""Argument checks and the block layout of a packed (varlen) batch.

Legend: T = total tokens of the packed batch, H_q / H_kv = query / key-value heads, D = head dim,
N = number of blocks over all documents, B = ``block_size``.

MoBA cuts every document on its own into consecutive blocks of ``block_size`` keys starting at the
document's first token; only the last block of a document may be shorter (MoBA paper, arXiv 2502.13189,
Sec. 2.2; the reference code's ``calc_chunks``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

_HOST_CU: dict[int, tuple] = {}  # id(cu_seqlens) -> (weakref, version counter, host list)


def host_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, copied from the device once per tensor.

    Every layer of a training step passes the same ``cu_seqlens`` tensor; reading it with ``.tolist()`` in
    each call would make the host wait for the GPU once per layer (no kernel queued ahead). The copy is
    kept while the tensor lives and read again after an in-place change (the tensor's version counter
    moves). Inference-mode tensors have no version counter: they are read every call. The returned list is
    the cached one: read it, do not modify it.
    """
    try:
        version = cu_seqlens._version
    except RuntimeError:  # inference tensor
        return cu_seqlens.tolist()
    key = id(cu_seqlens)
    hit = _HOST_CU.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == version:
        return hit[2]
    if len(_HOST_CU) >= 256:
        for k in [k for k, (ref, _, _) in _HOST_CU.items() if ref() is None]:
            del _HOST_CU[k]
        if len(_HOST_CU) >= 256:
            _HOST_CU.clear()
    cu = cu_seqlens.tolist()
    _HOST_CU[key] = (weakref.ref(cu_seqlens), version, cu)
    return cu


def check_moba_args(q, k, v, cu_seqlens, max_seqlen, block_size, top_k) -> None:
    """Validate the arguments of ``moba_attention`` (and its reference).

    Raises:
        ValueError: naming the argument and the bad value: shapes that disagree, a query head count
            that is not a multiple of the key-value head count, ``block_size`` not a positive multiple
            of 16, ``top_k < 1``, ``cu_seqlens`` not int32 / not 1-D / not starting at 0 / not sorted /
            not ending at ``total_tokens``, ``max_seqlen`` smaller than the longest document.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (total_tokens, heads, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same total_tokens; got q {q.shape[0]}, k {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim; got q {q.shape[2]}, k {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a positive multiple of key/value heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16 != 0:
        raise ValueError(f"block_size={block_size!r} must be a positive multiple of 16")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if torch.is_tensor(cu_seqlens)
               else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor; got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 entries (0 and total_tokens); got {cu_seqlens.numel()}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    cu = host_cu_seqlens(cu_seqlens)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0; got {cu[0]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu}")
    if cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens[-1]={cu[-1]} must equal total_tokens={q.shape[0]}")
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    if not isinstance(max_seqlen, int) or max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen!r} must be an int >= the longest document ({longest})")


@dataclass
class BlockLayout:
    """Blocks of a packed batch, all tensors on the input's device.

    Attributes:
        cu_blocks: int32 (N + 1,) token offsets of the block boundaries over the whole batch (each
            block as its own varlen "sequence", the layout of the current-block causal part).
        block_start: int64 (N,) first token of each block.
        block_len: int64 (N,) tokens in each block (``block_size`` except a document's last block).
        doc_block_offset: int64 (num_docs + 1,) first block of each document (cumulative count).
        token_block: int64 (T,) global block of each token.
        token_doc: int64 (T,) document of each token.
        max_blocks_per_doc: the largest number of blocks in one document (host int).
    """

    cu_blocks: torch.Tensor
    block_start: torch.Tensor
    block_len: torch.Tensor
    doc_block_offset: torch.Tensor
    token_block: torch.Tensor
    token_doc: torch.Tensor
    max_blocks_per_doc: int

    @property
    def num_blocks(self) -> int:
        return self.block_start.numel()


def block_layout(cu_seqlens: torch.Tensor, block_size: int) -> BlockLayout:
    """Cut every document of ``cu_seqlens`` into blocks of ``block_size`` tokens (last one may be short).

    Zero-length documents get no block. Runs a few small host syncs (block counts); the Triton backend
    uses its own sync-free layout.
    """
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    n_doc_blocks = (lens + block_size - 1) // block_size
    doc_block_offset = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=device)
    doc_block_offset[1:] = torch.cumsum(n_doc_blocks, 0)
    num_blocks = int(doc_block_offset[-1])
    total = int(cu[-1])
    block_doc = torch.repeat_interleave(torch.arange(lens.numel(), device=device), n_doc_blocks)
    block_in_doc = torch.arange(num_blocks, device=device) - doc_block_offset[block_doc]
    block_start = cu[block_doc] + block_in_doc * block_size
    block_end = torch.minimum(block_start + block_size, cu[block_doc + 1])
    block_len = block_end - block_start
    cu_blocks = torch.zeros(num_blocks + 1, dtype=torch.int32, device=device)
    cu_blocks[1:] = block_end.to(torch.int32)
    token_doc = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=total)
    pos = torch.arange(total, device=device) - cu[token_doc]
    token_block = doc_block_offset[token_doc] + pos // block_size
    max_blocks = int(n_doc_blocks.max()) if n_doc_blocks.numel() else 0
    return BlockLayout(
        cu_blocks=cu_blocks,
        block_start=block_start,
        block_len=block_len,
        doc_block_offset=doc_block_offset,
        token_block=token_block,
        token_doc=token_doc,
        max_blocks_per_doc=max_blocks,
    )
