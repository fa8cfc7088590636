"""MoBA inside Hugging Face ``transformers`` models (Llama / Qwen2 / Mistral families).

``register()`` adds an attention function named ``"moba"`` to transformers' ``AttentionInterface``.
``apply_moba(model, cfg)`` switches a loaded model to it and marks, per attention module, whether the
layer runs MoBA or keeps full causal attention (``MoBAConfig.full_attn_layers``, the paper's
layer-wise hybrid, Sec. 3.2). ``set_moba_layers`` changes that set between steps (hybrid schedules).

transformers calls the function per layer as ``fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)`` with query (B, H_q, T, D) and key / value (B, H_kv, T, D), not
expanded for GQA. Packed documents arrive as the flash-attention keyword arguments the model was called
with (``cu_seq_lens_q``, ``max_length_q``): every document is attended on its own in both MoBA and full
layers. Without them, documents are where ``position_ids`` restart at 0 (transformers' padding-free
convention, as its flash-attention path reads them), and each batch row is at least one sequence. A 2-D
padding ``attention_mask`` is not used by this implementation (transformers builds none for custom
functions): express padding as its own document in ``cu_seqlens`` instead.
"""

from __future__ import annotations

import torch

from .attention import moba_attention
from .config import MoBAConfig
from .flash import varlen_causal_attention

ATTN_IMPLEMENTATION = "moba"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of packed rows given only by ``position_ids`` restarting at 0.

    position_ids: (B, T) integer. A document starts at every row start and wherever a position is 0, as
    in transformers' padding-free convention (``prepare_fa_kwargs_from_position_ids``, which its
    flash-attention path uses when no ``cu_seq_lens_*`` are passed). Returns ``(cu_seqlens, max_seqlen)``
    over the flattened B * T tokens: int32 (num_docs + 1,) on ``position_ids``' device, and an int.
    """
    B, T = position_ids.shape
    starts = position_ids == 0  # (B, T)
    starts[:, 0] = True  # rows never attend to each other
    idx = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_args(batch: int, seqlen: int, kwargs: dict, device) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the flattened (batch * seqlen) tokens of one attention call: the
    ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments when given; else the documents that
    ``position_ids`` (B, T) mark by restarting at 0 (``cu_seqlens_from_position_ids``); else one
    sequence per batch row."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return cu.to(device=device, dtype=torch.int32), int(max_len)
    pos = kwargs.get("position_ids")
    if pos is not None and pos.numel() == batch * seqlen:
        cu, max_len = cu_seqlens_from_position_ids(pos.reshape(batch, seqlen))
        return cu.to(device), max_len
    cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
    return cu, seqlen


def moba_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: MoBA or full causal attention for ``module`` (one layer).

    Shapes: query (B, H_q, T, D), key / value (B, H_kv, T, D) -> output (B, T, H_q, D), weights None.

    Raises:
        ValueError: the model was not prepared with ``apply_moba``, or attention dropout is requested
            in training (MoBA here has no dropout).
    """
    cfg: MoBAConfig | None = getattr(module, "moba_config", None)
    if cfg is None:
        raise ValueError("attn_implementation='moba' needs moba_core.hf.apply_moba(model, MoBAConfig(...)) first")
    if dropout and module.training:
        raise ValueError(f"attention dropout={dropout} is not supported with MoBA; set it to 0")
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    cu, max_len = packed_args(B, T, kwargs, query.device)
    q = query.transpose(1, 2).reshape(B * T, Hq, D)
    k = key.transpose(1, 2).reshape(B * T, Hkv, D)
    v = value.transpose(1, 2).reshape(B * T, Hkv, D)
    if getattr(module, "moba_enabled", True):
        o = moba_attention(
            q, k, v, cu, max_len, cfg.block_size, cfg.top_k,
            softmax_scale=scaling, group_routing=cfg.group_routing, backend=cfg.backend,
        )
    else:
        o = varlen_causal_attention(q, k, v, cu, max_len, softmax_scale=scaling)
    return o.reshape(B, T, Hq, D), None


def register(name: str = ATTN_IMPLEMENTATION, fn=moba_attention_forward) -> None:
    """Register ``fn`` as transformers attention implementation ``name`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def attention_modules(model) -> list:
    """The self-attention modules of a decoder model, in layer order (modules with ``layer_idx``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    return sorted(mods, key=lambda m: m.layer_idx)


def set_moba_layers(model, layers) -> int:
    """Run MoBA in exactly the layers ``layers`` (indices) and full attention elsewhere; returns how many."""
    layers = set(layers)
    for m in attention_modules(model):
        m.moba_enabled = m.layer_idx in layers
    return len(layers)


def apply_moba(model, cfg: MoBAConfig, name: str = ATTN_IMPLEMENTATION, fn=moba_attention_forward) -> list[int]:
    """Switch ``model`` to MoBA attention with ``cfg``; returns the indices of the MoBA layers.

    Layers in ``cfg.full_attn_layers`` keep full causal attention (still document-masked). ``name`` / ``fn``
    register another attention function that wraps ``moba_attention_forward`` (e.g. sequence parallelism).

    Raises:
        ValueError: the model has no attention modules with ``layer_idx``, or a bad layer index.
    """
    register(name, fn)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    layers = cfg.moba_layers(len(mods))
    for m in mods:
        m.moba_config = cfg
    set_moba_layers(model, layers)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    return layers
