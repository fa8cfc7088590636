"""Ulysses sequence parallelism through DeepSpeed, with packed documents kept apart.

Outside attention every rank of a sequence-parallel group holds ``T / sp_size`` consecutive tokens of the
same packed micro-batch (labels were shifted on the whole sequence before sharding, in ``data``). In each
attention layer DeepSpeed's ``DistributedAttention`` all-to-alls q, k, v from sequence-sharded
``(B, T/sp, H, D)`` to head-sharded ``(B, T, H/sp, D)``; the layer then runs MoBA (or document-masked full
attention) on the whole sequence for its heads with the *global* ``cu_seqlens``, and the inverse
all-to-all returns ``(B, T/sp, H, D)``. So documents never attend to each other under SP, unlike
wrappers that rebuild the mask as plain causal. Per-head routing is local to a head; group routing stays
exact because a KV head and its query heads land on the same rank (contiguous head split).

Loss: each rank sums the token losses of its shard; the loop divides that sum by the valid-token count
of the whole optimizer step (all micro-batches, all ranks) and multiplies by ``grad_accum * dp_size``,
since DeepSpeed divides by ``grad_accum`` and sums gradients over the sp group while averaging over
data-parallel ranks (its ``sequence_parallel_size`` accounting). So the step's gradient is that of the
mean over all its valid tokens, whatever ``sp_size`` (``train.loop.loss_scale``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moba_core.hf import moba_attention_forward

SP_ATTN_IMPLEMENTATION = "moba_ulysses"


def init_sp_groups(sp_size: int):
    """Create DeepSpeed's sequence-parallel and sequence-data-parallel groups; returns its ``mpu`` module."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:
        parallel_state_sp.initialize_sequence_parallel(sp_size)
    return parallel_state_sp


def _local_attention(q, k, v, module, attention_mask, scaling, dropout, kwargs):
    """Runs after the all-to-all: q (B, T, H_q/sp, D) etc.; returns (B, T, H_q/sp, D)."""
    o, _ = moba_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
        scaling=scaling, dropout=dropout, **kwargs,
    )
    return o


def sp_attention(sp_group):
    """The Ulysses-wrapped MoBA attention function: ``(name, fn)`` for ``moba_core.hf.apply_moba``."""
    from deepspeed.sequence.layer import DistributedAttention

    dist_attn = DistributedAttention(_local_attention, sp_group, scatter_idx=2, gather_idx=1)

    def sp_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query (B, H_q, T/sp, D) -> (B, T/sp, H_q, D), the layout DistributedAttention shards.
        q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
        o = dist_attn(q, k, v, 0, None, module, attention_mask, scaling, dropout, kwargs)
        return o, None

    return SP_ATTN_IMPLEMENTATION, sp_attention_forward


def shard_batch(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """This rank's contiguous slice of the token tensors (``input_ids``, ``labels``, ``position_ids``,
    each (1, T) -> (1, T/sp)); ``cu_seqlens`` and ``max_seqlen`` stay global."""
    if sp_size == 1:
        return batch
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        t = batch[key]
        n = t.shape[1] // sp_size
        out[key] = t[:, sp_rank * n : (sp_rank + 1) * n]
    return out


def group_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of a tensor over ``group`` (a copy; no gradient flows through it)."""
    x = x.detach().clone()
    if group is not None:
        dist.all_reduce(x, group=group)
    return x
