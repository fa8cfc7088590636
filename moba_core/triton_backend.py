"""The Triton backend of ``moba_attention``: dense FlashAttention where MoBA is dense, Triton kernels elsewhere.

Split of the work (exact, MoBA paper arXiv 2502.13189 Sec. 2.2):
    * A query in one of the first ``top_k`` blocks of its document has at most ``top_k - 1`` earlier
      blocks, so MoBA selects them all and the query attends its whole causal prefix: the first
      ``min(len, top_k * block_size)`` tokens of every document are plain causal attention. They run
      through PyTorch's SDPA (documents of equal length: strided views, no copy) or varlen
      FlashAttention (``moba_core.flash.varlen_causal_attention``, rows gathered), the fastest dense
      kernels the machine has. A document no longer than ``top_k * block_size`` is entirely dense.
    * Every other query (a "sparse block") goes through the kernels of ``kernels``: routing (block
      mean-pool, fp32 scores, top-(k-1), key-block-major lists), a one-pass forward with per-(query,
      slot) partials merged with the current-block part by LSE, and a FlashAttention-2 style backward.
    The two query sets are disjoint, so each query's output comes from one part; the key gradients add.
The gate gets no gradient. Head dims above 128 fall back to the ``flash`` backend.
``MOBA_DENSE_PATH=0`` routes every block through the Triton kernels (for tests of the kernels alone).
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import torch
import torch.nn.functional as F

from kernels.attention_bwd import moba_bwd
from kernels.attention_fwd import moba_fwd
from kernels.config import INTERPRET, kernel_config
from kernels.routing import block_layout, block_means, build_block_lists, route_topk

from .flash import varlen_causal_attention
from .graphs import GRAPHS, graph_key, graphs_enabled
from .layout import host_cu_seqlens
from .varlen import TorchVarlen, varlen_primitives

MAX_HEAD_DIM = 128


def dense_path_enabled() -> bool:
    """Whether the dense prefixes run through FlashAttention (``MOBA_DENSE_PATH=0`` turns it off)."""
    return os.environ.get("MOBA_DENSE_PATH", "1") != "0"


@functools.lru_cache(maxsize=32)
def cached_layout(lens: tuple, block_size: int, dense_blocks: int, device: torch.device) -> dict:
    """``kernels.routing.block_layout`` plus the row index of the dense prefixes, cached per batch shape
    (every layer of every step with the same packing reuses it: no host work, no copy)."""
    layout = block_layout(list(lens), block_size, dense_blocks, device)
    segs = layout["dense_segments"]
    layout["uniform"] = len(set(lens)) == 1 and len(segs) == len(lens)
    if segs:
        layout["dense_idx"] = torch.cat([torch.arange(s, s + n) for s, n in segs]).to(device)
        layout["dense_cu"] = torch.tensor([0, *itertools.accumulate(n for _, n in segs)], dtype=torch.int32,
                                          device=device)
        layout["dense_max"] = max(n for _, n in segs)
    return layout


def partial_budget(q: torch.Tensor) -> int:
    """Bytes allowed for the kernels' temporary per-entry buffers (partials, gathered rows): twice the size of q,
    at least 128 MiB (``MOBA_PARTIAL_BUDGET_MIB`` sets that floor, for sweeps). Heads are processed in chunks
    that fit (peak memory stays within 1.25x full attention's: at most 1.17x at the benchmark points, session 16); each
    chunk costs a few kernel launches (two heads per chunk instead of one: -0.5% at the 128K points)."""
    floor_mib = int(os.environ.get("MOBA_PARTIAL_BUDGET_MIB", "128"))
    return max(2 * q.numel() * q.element_size(), floor_mib << 20)


def dense_blocks_of(top_k: int) -> int:
    """Blocks at the start of each document that the dense path takes: ``top_k``, or 0 with ``MOBA_DENSE_PATH=0``."""
    return top_k if dense_path_enabled() else 0


def list_tile(q, layout: dict, block_size: int, top_k: int) -> int | None:
    """The query tile of the routing lists (``build_block_lists``), or None when the routing builds none
    (``top_k = 1``, or no sparse block in ``layout``)."""
    if top_k > 1 and layout["NS"]:
        return kernel_config("list_fwd", block_size, q.shape[-1], q.dtype)["BLOCK_M"]
    return None


def moba_routing(q, k, lens, block_size: int, top_k: int, group_routing: bool, dense_blocks: int):
    """Routing tables for the kernels: (layout, sel, lists or None). No host sync."""
    layout = cached_layout(tuple(lens), block_size, dense_blocks, q.device)
    sel = route_topk(q, block_means(k, layout), layout, top_k, block_size, group_routing)
    tile_m = list_tile(q, layout, block_size, top_k)
    lists = None if tile_m is None else build_block_lists(sel, layout["NB"], tile_m)
    return layout, sel, lists


def dense_primitives(q: torch.Tensor):
    """The varlen primitive pair whose forward output and LSE the dense prefixes save for the backward:
    FlashAttention's or cuDNN's (``moba_core.varlen.CudnnVarlen``) where they run (CUDA, fp16 / bf16), else None
    (the prefixes are recomputed in the backward: the exact float32 primitives hold O(rows x keys) memory)."""
    prims = varlen_primitives(q.device, q.dtype, q.shape[-1])
    return None if isinstance(prims, TorchVarlen) else prims


class _DenseRows:
    """The dense prefixes of all documents as one causal attention (no autograd graph of its own).

    With FlashAttention primitives (CUDA, fp16 / bf16: ``moba_core.varlen.varlen_primitives``) the prefix rows
    are gathered (a slice when there is one prefix) and run through varlen FlashAttention; the forward returns
    its LSE for the caller's ``save_for_backward``, and the backward calls FlashAttention's backward with it
    and the prefix rows of the saved output. Otherwise (CPU, fp32) the forward attends without a graph
    (documents of equal length through SDPA on strided views, others through ``varlen_causal_attention``) and
    the backward recomputes it with a graph. ``forward`` writes the output rows into ``o``; ``backward``
    writes dq rows and adds into dk, dv.
    """

    def __init__(self, q, k, lens, layout, scale):
        self.n, self.L = len(lens), lens[0]
        self.P = layout["dense_segments"][0][1]
        self.idx, self.cu, self.max_p = layout["dense_idx"], layout["dense_cu"], layout["dense_max"]
        self.scale, self.gqa = scale, q.shape[1] != k.shape[1]
        self.prims = dense_primitives(q)
        self.uniform = layout["uniform"] and self.prims is None  # strided SDPA views, no gather
        segs = layout["dense_segments"]
        self.span = (segs[0][0], segs[0][0] + segs[0][1]) if len(segs) == 1 else None  # one prefix: a slice

    def _rows(self, x):
        if self.uniform:  # (n, H, P, D) strided view
            return x.unflatten(0, (self.n, self.L))[:, : self.P].transpose(1, 2)
        if self.span is not None:
            return x[self.span[0]: self.span[1]]
        return x[self.idx]

    def _attend(self, q, k, v):
        if self.uniform:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
        return varlen_causal_attention(q, k, v, self.cu, self.max_p, softmax_scale=self.scale)

    def _write(self, dst, src, add=False):
        if self.uniform:
            view = dst.unflatten(0, (self.n, self.L))[:, : self.P]
            view.add_(src.transpose(1, 2)) if add else view.copy_(src.transpose(1, 2))
        elif self.span is not None:
            view = dst[self.span[0]: self.span[1]]
            view.add_(src) if add else view.copy_(src)
        elif add:
            dst.index_add_(0, self.idx, src.to(dst.dtype))
        else:
            dst.index_copy_(0, self.idx, src.to(dst.dtype))

    def forward(self, q, k, v, o) -> tuple:
        """Writes the prefix rows of ``o``; returns the tensors the backward needs besides q, k, v and o: the
        LSE (fp32 (HQ, prefix rows)) with FlashAttention, else none."""
        rows = [self._rows(x) for x in (q, k, v)]
        if self.prims is not None:
            out, lse = self.prims.fwd(*rows, self.cu, self.cu, self.max_p, self.max_p, True, self.scale)
            self._write(o, out)
            return (lse,)
        with torch.no_grad():
            self._write(o, self._attend(*rows))
        return ()

    def backward(self, q, k, v, o, do, saved, dq, dk, dv):
        if self.prims is not None:
            (lse,) = saved
            gq, gk, gv = self.prims.bwd(*(self._rows(x) for x in (do, q, k, v, o)), lse, self.cu, self.cu,
                                        self.max_p, self.max_p, True, self.scale)
        else:
            leaves = [self._rows(x).detach().requires_grad_() for x in (q, k, v)]
            with torch.enable_grad():
                out = self._attend(*leaves)
            gq, gk, gv = torch.autograd.grad(out, leaves, self._rows(do))
        self._write(dq, gq)
        self._write(dk, gk, add=True)
        self._write(dv, gv, add=True)


LIST_TENSORS = ("entries", "list_ptr", "tile_list", "tile_first")  # the tensors of build_block_lists' dict


def _attend(q, k, v, lens, block_size, top_k, scale, group_routing, layout, sel, lists):
    """The attention given the routing: the sparse kernels and the dense prefixes; returns (o, lse, budget,
    dense_saved)."""
    T, HQ, D = q.shape
    o = torch.empty((T, HQ, D), device=q.device, dtype=q.dtype)
    budget = partial_budget(q)
    lse = moba_fwd(q, k, v, layout, sel, lists, top_k, block_size, scale, group_routing, o, budget)
    dense_saved = ()
    if layout["dense_segments"]:
        dense_saved = _DenseRows(q, k, lens, layout, scale).forward(q, k, v, o)
    return o, lse, budget, dense_saved


def _moba_forward(q, k, v, lens, block_size, top_k, scale, group_routing):
    """Both parts of the forward; returns (o, lse, layout, sel, lists, dense_blocks, budget, dense_saved)."""
    dense_blocks = dense_blocks_of(top_k)
    layout, sel, lists = moba_routing(q, k, lens, block_size, top_k, group_routing, dense_blocks)
    o, lse, budget, dense_saved = _attend(q, k, v, lens, block_size, top_k, scale, group_routing, layout, sel, lists)
    return o, lse, layout, sel, lists, dense_blocks, budget, dense_saved


def _route_op(q, k, lens, block_size, top_k, group_routing):
    """``torch.ops.moba.route``: ``moba_routing`` as one dispatcher op whose outputs are all tensors: sel and the
    list tensors (``LIST_TENSORS``, when the routing builds lists)."""
    _, sel, lists = moba_routing(q, k, lens, block_size, top_k, group_routing, dense_blocks_of(top_k))
    return [sel, *(lists[n] for n in LIST_TENSORS if lists)]


def _routing_of(q, lens, block_size, top_k, routing):
    """(layout, sel, lists or None) from ``torch.ops.moba.route``'s outputs and the host values the routing
    decided (re-derived from the cached layout: under selective checkpointing the recompute gets the op's kept
    outputs, not its host values)."""
    layout = cached_layout(tuple(lens), block_size, dense_blocks_of(top_k), q.device)
    tile_m = list_tile(q, layout, block_size, top_k)
    lists = None if tile_m is None else dict(zip(LIST_TENSORS, routing[1:]), tile_m=tile_m)
    return layout, routing[0], lists


def _forward_op(q, k, v, routing, lens, block_size, top_k, scale, group_routing):
    """``torch.ops.moba.triton_fwd``: the attention given ``torch.ops.moba.route``'s outputs, as one dispatcher
    op: o, lse and the dense prefixes' saved LSE."""
    layout, sel, lists = _routing_of(q, lens, block_size, top_k, routing)
    o, lse, _, dense_saved = _attend(q, k, v, lens, block_size, top_k, scale, group_routing, layout, sel, lists)
    return [o, lse, *dense_saved]


# The routing and the attention as two dispatcher ops, so that selective activation checkpointing
# (``torch.utils.checkpoint`` with ``create_selective_checkpoint_contexts``: ``train.recompute_attention=false``,
# ``train.recompute_routing=false``) can keep their outputs instead of running them again in the recompute; a
# Python autograd.Function's body is invisible to it. Low-level ``torch.library`` ops: ~15 us per call on a
# slow host, against ~500 us through ``torch.library.custom_op``.
if not hasattr(torch.ops.moba, "route"):
    _LIB = torch.library.Library("moba", "DEF")
    _LIB.define("route(Tensor q, Tensor k, int[] lens, int block_size, int top_k, bool group_routing) -> Tensor[]")
    _LIB.impl("route", _route_op, "CompositeExplicitAutograd")
    _LIB.define("triton_fwd(Tensor q, Tensor k, Tensor v, Tensor[] routing, int[] lens, int block_size, int top_k, "
                "float scale, bool group_routing) -> Tensor[]")
    _LIB.impl("triton_fwd", _forward_op, "CompositeExplicitAutograd")


class _TritonMoBA(torch.autograd.Function):
    """Every tensor the backward needs goes through ``save_for_backward``: under non-reentrant activation
    checkpointing (``torch.utils.checkpoint``, HF's gradient checkpointing) the saved-tensor hooks then drop
    them after the forward and recompute them in the backward. Tensors kept as ``ctx`` attributes would stay
    alive for every checkpointed layer until the backward reaches it (measured: +17 GiB at 128K tokens on
    the 1B model). The dense prefixes save their LSE the same way (or, without FlashAttention, are recomputed
    in the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, lens, block_size, top_k, scale, group_routing):
        routing = torch.ops.moba.route(q, k, lens, block_size, top_k, group_routing)
        o, lse, *dense_saved = torch.ops.moba.triton_fwd(q, k, v, routing, lens, block_size, top_k, scale,
                                                         group_routing)
        layout, sel, _ = _routing_of(q, lens, block_size, top_k, routing)
        list_tensors = routing[1:] or [None] * len(LIST_TENSORS)
        ctx.save_for_backward(q, k, v, o, lse, sel, *list_tensors, *dense_saved)
        ctx.args = _backward_args(q, lens, layout, block_size, top_k, scale, group_routing)
        return o

    @staticmethod
    def backward(ctx, do):
        return (*_backward(ctx.args, do, *ctx.saved_tensors), None, None, None, None, None)


def _backward_args(q, lens, layout, block_size: int, top_k: int, scale: float, group_routing: bool) -> tuple:
    """The host values ``_backward`` needs besides the saved tensors."""
    return (lens, layout, list_tile(q, layout, block_size, top_k), dense_blocks_of(top_k), partial_budget(q), top_k,
            block_size, scale, group_routing)


def _backward(args: tuple, do, q, k, v, o, lse, sel, *rest) -> list:
    """dq, dk, dv of one call from its saved tensors (q, k, v, o, lse, sel, the list tensors (``LIST_TENSORS``;
    None without lists), the dense prefixes' saved tensors) and ``_backward_args``' host values."""
    list_tensors, dense_saved = rest[: len(LIST_TENSORS)], rest[len(LIST_TENSORS):]
    lens, layout, tile_m, dense_blocks, budget, top_k, block_size, scale, group_routing = args
    lists = dict(zip(LIST_TENSORS, list_tensors), tile_m=tile_m) if tile_m is not None else None
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    moba_bwd(do, q, k, v, o, lse, layout, sel, lists, top_k, block_size, scale, group_routing, dense_blocks,
             dq, dk, dv, budget)
    if layout["dense_segments"]:
        _DenseRows(q, k, lens, layout, scale).backward(q, k, v, o, do, dense_saved, dq, dk, dv)
    return [dq, dk, dv]


def _graph_forward(q, k, v, lens, block_size, top_k, scale, group_routing) -> list:
    """The captured forward: [o, lse, sel, list tensors (``LIST_TENSORS``, None without lists), dense saved]."""
    o, lse, _, sel, lists, _, _, dense_saved = _moba_forward(q, k, v, lens, block_size, top_k, scale, group_routing)
    list_tensors = [lists[n] for n in LIST_TENSORS] if lists is not None else [None] * len(LIST_TENSORS)
    return [o, lse, sel, *list_tensors, *dense_saved]


class _GraphedMoBA(torch.autograd.Function):
    """``_TritonMoBA`` with its forward and backward replayed from CUDA graphs (``moba_core.graphs``); the same
    saved tensors (clones of the graph's outputs), so activation checkpointing drops and recomputes them alike.
    The routing and attention do not go through the ``torch.ops.moba`` ops here: selective checkpointing keeps
    none of their outputs and recomputes (replays) the call instead. A backward whose graphs were dropped from
    the cache since its forward (more than ``GRAPH_CACHE_SIZE`` call shapes in between) runs eagerly."""

    @staticmethod
    def forward(ctx, q, k, v, lens, block_size, top_k, scale, group_routing, key, graph_fwd):
        outs = GRAPHS.run(key, "fwd", graph_fwd, [q, k, v])
        ctx.save_for_backward(q, k, v, *outs)
        layout = cached_layout(tuple(lens), block_size, dense_blocks_of(top_k), q.device)
        ctx.args = _backward_args(q, lens, layout, block_size, top_k, scale, group_routing)
        ctx.key = key
        return outs[0]

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors
        if GRAPHS.has(ctx.key):
            grads = GRAPHS.run(ctx.key, "bwd", functools.partial(_backward, ctx.args), [do, *saved])
        else:
            grads = _backward(ctx.args, do, *saved)
        return (*grads, None, None, None, None, None, None, None)


def triton_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, *, softmax_scale=None,
                          group_routing=False):
    """MoBA attention with the Triton kernels (arguments as ``moba_core.moba_attention``, already checked).

    Args:
        q: (T, HQ, D); k, v: (T, HKV, D); fp16 / bf16 / fp32; any strides (a tensor whose head dim is not
            contiguous is copied first: the kernels read D with stride 1). cu_seqlens int32 (docs + 1,).
    Returns:
        o: (T, HQ, D) in q's dtype, differentiable in q, k, v.
    Raises:
        ValueError: bfloat16 inputs under ``TRITON_INTERPRET=1`` (the interpreter's bf16 dots are wrong).
    Head dims above 128 run the ``flash`` backend instead (same semantics). Reads ``cu_seqlens`` on the host
    once per tensor (``moba_core.layout.host_cu_seqlens``): later calls with it queue their kernels without
    waiting for the GPU.
    """
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        from .flash import flash_moba_attention

        return flash_moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size, top_k,
                                    softmax_scale=softmax_scale, group_routing=group_routing)
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("backend='triton' under TRITON_INTERPRET=1 got bfloat16 inputs: Triton's interpreter computes "
                         "bf16 dot products wrongly (outputs off by orders of magnitude), so use float32 / float16 "
                         "there, or backend='flash'")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    if q.shape[0] == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # empty, differentiable in q, k, v
    cu = host_cu_seqlens(cu_seqlens)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if dense_path_enabled():
        layout = cached_layout(tuple(lens), block_size, top_k, q.device)
        if layout["NS"] == 0:  # every document fits in top_k blocks: MoBA is causal attention, exactly
            if not layout["uniform"]:
                return varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale)
            n, L = len(lens), lens[0]
            qs, ks, vs = (x.view(n, L, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
            return o.transpose(1, 2).reshape(q.shape)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if graphs_enabled(q):
        key = graph_key(q, k, lens, block_size, top_k, scale, group_routing)
        if GRAPHS.ready(key):
            fwd = functools.partial(_graph_forward, lens=lens, block_size=block_size, top_k=top_k, scale=scale,
                                    group_routing=group_routing)
            if grad:
                return _GraphedMoBA.apply(q, k, v, lens, block_size, top_k, scale, group_routing, key, fwd)
            return GRAPHS.run(key, "fwd", fwd, [q, k, v])[0]
    if grad:
        return _TritonMoBA.apply(q, k, v, lens, block_size, top_k, scale, group_routing)
    return _moba_forward(q, k, v, lens, block_size, top_k, scale, group_routing)[0]
