"""MoBA inside Hugging Face ``transformers`` models (Llama / Qwen2 / Mistral families).

``register()`` adds an attention function named ``"moba"`` to transformers' ``AttentionInterface``.
``apply_moba(model, cfg)`` switches a loaded model to it and marks, per attention module, whether the
layer runs MoBA or keeps full causal attention (``MoBAConfig.full_attn_layers``, the paper's
layer-wise hybrid, Sec. 3.2), and gives each layer its own settings (``MoBAConfig.layers``: per-layer
block size and top-k). ``set_moba_layers`` changes that set between steps (hybrid schedules).

transformers calls the function per layer as ``fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)`` with query (B, H_q, T, D) and key / value (B, H_kv, T, D), not
expanded for GQA. Packed documents arrive as the flash-attention keyword arguments the model was called
with (``cu_seq_lens_q``, ``max_length_q``): every document is attended on its own in both MoBA and full
layers. Without them, documents are where ``position_ids`` restart at 0 (transformers' padding-free
convention, as its flash-attention path reads them), and each batch row is at least one sequence. A 2-D
padding ``attention_mask`` (registered with transformers' flash-attention mask function, so it arrives as
the 2-D mask) makes each row's real tokens one document. With a KV cache (``generate``) the queries are the
last positions of each row and route as in a full forward (``moba_core.decode``).
"""

from __future__ import annotations

import torch

from .attention import moba_attention
from .config import MoBAConfig
from .decode import BlockMeansCache, moba_attention_kv
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


def padding_spans(attention_mask, batch: int, kv_len: int) -> list[tuple[int, int]] | None:
    """Each row's real tokens ``[start, end)`` from a 2-D padding mask (B, kv_len), or None without padding.

    Raises:
        ValueError: a mask that is not 2-D (B, kv_len), or a row whose real tokens are not contiguous (left or
            right padding only).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(f"MoBA takes a 2-D padding attention_mask of shape ({batch}, {kv_len}); got "
                         f"{tuple(attention_mask.shape)} (a static cache or a custom 4-D mask is not supported)")
    real = attention_mask.bool()
    if bool(real.all()):
        return None
    counts = real.sum(1).tolist()
    starts = real.int().argmax(1).tolist()
    spans = []
    for b, (s, n) in enumerate(zip(starts, counts)):
        s = s if n else kv_len
        if n and not bool(real[b, s: s + n].all()):
            raise ValueError(f"attention_mask row {b} has padding between real tokens; MoBA supports left or right "
                             "padding only")
        spans.append((s, s + n))
    return spans


def _rows_as_documents(spans, batch: int, q_len: int, kv_len: int, device):
    """Query / key rows and offsets when each batch row's real tokens form one document whose last ``q_len``
    positions (or fewer, past padding) are the queries. Returns (q_idx, k_idx, cu_q, cu_k) over the flattened
    (B * q_len) queries and (B * kv_len) keys."""
    q_rows, k_rows, cu_q, cu_k = [], [], [0], [0]
    for b, (s, e) in enumerate(spans):
        if q_len < kv_len and e != kv_len and e > s:
            raise ValueError(f"attention_mask row {b} ends with padding while decoding with a KV cache; pad on the "
                             "left for generation")
        q_lo = max(s, kv_len - q_len)
        q_hi = max(q_lo, e)
        q_rows.append(torch.arange(q_lo, q_hi) - (kv_len - q_len) + b * q_len)
        k_rows.append(torch.arange(s, q_hi) + b * kv_len)
        cu_q.append(cu_q[-1] + q_hi - q_lo)
        cu_k.append(cu_k[-1] + q_hi - s)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return torch.cat(q_rows).to(device), torch.cat(k_rows).to(device), as_t(cu_q), as_t(cu_k)


def _means_cache(module, block_size: int) -> BlockMeansCache:
    cache = getattr(module, "_moba_means_cache", None)
    if cache is None or cache.block_size != block_size:
        cache = module._moba_means_cache = BlockMeansCache(block_size)
    return cache


def moba_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: MoBA or full causal attention for ``module`` (one layer).

    Shapes: query (B, H_q, Tq, D), key / value (B, H_kv, Tk, D) -> output (B, Tq, H_q, D), weights None.
    ``Tq < Tk`` (a KV cache: generation, chunked prefill): the queries are the last positions of each row
    and route exactly as in a full forward (``moba_core.decode``; ``moba.decode=full`` attends the whole
    cache instead); block means of the cache are kept incrementally on the module. A 2-D padding
    ``attention_mask`` (left or right padding; left while decoding) makes each row's real tokens one
    document: padded positions neither attend nor are attended (their outputs are 0) and blocks count from
    the first real token. Without padding, packed documents come from ``cu_seq_lens_*`` or ``position_ids``.

    Raises:
        ValueError: the model was not prepared with ``apply_moba``, attention dropout in training, or a mask
            this function cannot honour (see ``padding_spans``).
    """
    cfg: MoBAConfig | None = getattr(module, "moba_config", None)
    if cfg is None:
        raise ValueError("attn_implementation='moba' needs moba_core.hf.apply_moba(model, MoBAConfig(...)) first")
    if dropout and module.training:
        raise ValueError(f"attention dropout={dropout} is not supported with MoBA; set it to 0")
    B, Hq, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    moba_on = getattr(module, "moba_enabled", True)
    q = query.transpose(1, 2).reshape(B * Tq, Hq, D)
    k = key.transpose(1, 2).reshape(B * Tk, Hkv, D)
    v = value.transpose(1, 2).reshape(B * Tk, Hkv, D)
    spans = padding_spans(attention_mask, B, Tk)
    if spans is None and Tq == Tk:
        cu, max_len = packed_args(B, Tq, kwargs, query.device)
        if moba_on:
            o = moba_attention(q, k, v, cu, max_len, cfg.block_size, cfg.top_k, softmax_scale=scaling,
                               group_routing=cfg.group_routing, backend=cfg.backend)
        else:
            o = varlen_causal_attention(q, k, v, cu, max_len, softmax_scale=scaling)
        return o.reshape(B, Tq, Hq, D), None
    q_idx, k_idx, cu_q, cu_k = _rows_as_documents(spans or [(0, Tk)] * B, B, Tq, Tk, query.device)
    qp, kp, vp = q[q_idx], k[k_idx], v[k_idx]
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    if torch.equal(cu_q, cu_k):  # padded full forward: every row's real tokens are its queries
        if moba_on:
            op = moba_attention(qp, kp, vp, cu_q, max(max_q, 1), cfg.block_size, cfg.top_k, softmax_scale=scaling,
                                group_routing=cfg.group_routing, backend=cfg.backend)
        else:
            op = varlen_causal_attention(qp, kp, vp, cu_q, max(max_q, 1), softmax_scale=scaling)
    else:
        full = not moba_on or cfg.decode == "full"
        means = None
        if not full and cfg.top_k > 1:
            bounds = cu_k.tolist()
            means = _means_cache(module, cfg.block_size).get([kp[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        op = moba_attention_kv(qp, kp, vp, cu_q, cu_k, cfg.block_size, cfg.top_k, softmax_scale=scaling,
                               group_routing=cfg.group_routing, full=full, block_means=means)
    o = q.new_zeros(q.shape).index_copy(0, q_idx, op)
    return o.reshape(B, Tq, Hq, D), None


def register(name: str = ATTN_IMPLEMENTATION, fn=moba_attention_forward) -> None:
    """Register ``fn`` as transformers attention implementation ``name`` (idempotent), with transformers'
    flash-attention mask function, which hands the attention function the 2-D padding mask (or None when
    nothing is padded) and never builds a (T x T) mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, flash_attention_mask)


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

    Layers in ``cfg.full_attn_layers`` keep full causal attention (still document-masked); a layer named in
    ``cfg.layers`` runs MoBA with its own ``block_size`` / ``top_k`` (``module.moba_config``). ``name`` / ``fn``
    register another attention function that wraps ``moba_attention_forward`` (e.g. sequence parallelism).

    Raises:
        ValueError: the model has no attention modules with ``layer_idx``, or a bad layer index.
    """
    register(name, fn)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    layers = cfg.moba_layers(len(mods))
    for m in mods:  # each layer's own block_size / top_k (MoBAConfig.layers), used in every call
        m.moba_config = cfg.for_layer(m.layer_idx, len(mods))
    set_moba_layers(model, layers)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    return layers


def moba_config_from_record(record: dict, backend: str = "auto") -> MoBAConfig:
    """A ``MoBAConfig`` from the ``moba`` dict that ``python -m train.export`` writes into ``config.json``
    (block_size, top_k, full_attn_layers, layers, group_routing, decode); ``backend`` is the machine's choice.

    Raises:
        ValueError: a record without block_size / top_k, or settings ``MoBAConfig`` refuses.
    """
    if not isinstance(record, dict) or "block_size" not in record or "top_k" not in record:
        raise ValueError(f"the model's 'moba' settings {record!r} need block_size and top_k")
    return MoBAConfig(block_size=record["block_size"], top_k=record["top_k"],
                      full_attn_layers=list(record.get("full_attn_layers", [])),
                      group_routing=bool(record.get("group_routing", False)), backend=backend,
                      layers={int(i): dict(o) for i, o in (record.get("layers") or {}).items()},
                      decode=record.get("decode", "moba"))


def load_moba_model(path, backend: str = "auto", **kwargs):
    """Load an exported model (``python -m train.export``) with the MoBA settings recorded in its config:
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, then ``apply_moba`` with the config's ``moba``
    dict (``moba_config_from_record``).

    Raises:
        ValueError: the config holds no ``moba`` settings (not a model exported with MoBA).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    record = getattr(model.config, "moba", None)
    if record is None:
        raise ValueError(f"{path}: config.json has no 'moba' settings; export it with python -m train.export, or "
                         "call apply_moba(model, MoBAConfig(...)) yourself")
    apply_moba(model, moba_config_from_record(record, backend))
    return model
