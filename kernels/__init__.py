"""Triton kernels for MoBA (imports torch and triton only).

    kernels.config         the launch-config table of every kernel (tiles, warps, stages; no autotuning)
    kernels.launch         kernel launches, directly to the compiled kernel on a repeat (MOBA_FAST_LAUNCH=1)
    kernels.routing        block tables, block mean-pool, fused scores + top-(k-1), key-block-major lists
    kernels.attention_fwd  block-sparse attention forward (partials merged by LSE)
    kernels.attention_bwd  block-sparse attention backward (dq, dk, dv; FlashAttention-2 style)
The benchmark that drives them through ``moba_core`` is ``python -m train.bench_kernels``; NOTES.md keeps
each kernel version's measurements.
"""
