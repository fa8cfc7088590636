"""MoBA (Mixture of Block Attention, Lu et al. 2025, arXiv 2502.13189): the algorithm and its public API.

    from moba_core import moba_attention
    o = moba_attention(q, k, v, cu_seqlens, max_seqlen, block_size=512, top_k=3)
"""

from .attention import BACKENDS, moba_attention, resolve_backend
from .config import MoBAConfig
from .reference import moba_attention_reference

__all__ = ["BACKENDS", "MoBAConfig", "moba_attention", "moba_attention_reference", "resolve_backend"]
