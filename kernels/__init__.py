"""Triton kernels for MoBA (imports torch and triton only).

    kernels.routing        block layout, block mean-pool, fused scores + top-(k-1), key-block-major lists
    kernels.attention_fwd  block-sparse attention forward (LSE saved)
    kernels.attention_bwd  block-sparse attention backward (dq, dk, dv)
    kernels.bench          GPU benchmark (``python -m kernels.bench``)
"""
