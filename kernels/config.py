"""Launch configurations of the MoBA Triton kernels: one table, no autotuning (see ``kernel_config``)."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_config(name: str, block_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Fixed launch configuration of one kernel (tiles, warps, stages), chosen without autotuning.

    Measured on an H200 (bf16, D=128 at 16 heads and D=64 at 32 query / 8 KV heads, ``launch/tune_kernels.py``;
    see ``kernels/NOTES.md``, "session 8 sweep"). A table instead of
    ``triton.autotune``: the first call at a new shape then costs compilation only, and the same choice
    holds in every process. ``MOBA_CFG_<NAME>=BM,BN,WARPS,STAGES`` overrides an entry (for sweeps).
    Tiles never exceed the block (``BLOCK_SIZE % BN == 0`` is required where keys of a block are tiled);
    ``route`` (``routing._route_topk_kernel``) tiles queries by BLOCK_M and candidate blocks by BLOCK_N.

    Raises:
        KeyError: an unknown kernel name.
    """
    env = os.environ.get(f"MOBA_CFG_{name.upper()}")
    if env:
        bm, bn, w, s = (int(x) for x in env.split(","))
    elif INTERPRET:
        bm, bn, w, s = 16, 16, 4, 1
    else:
        big = head_dim > 64 or dtype == torch.float32
        small_block = block_size <= 512
        if big:  # D 96 / 128, or fp32
            table = {
                # session 13: blocks of 257-512 keys take 128-query list tiles (list dQ, which shares the tile,
                # 18.5 -> 17.3 ms at 131072:512:8); session 14 sweep (TMA K/V loads, constant KSEL): list forward
                # at block 128 5.43 -> 5.30 ms with 128 x 32 tiles, 4 stages (2x65536:128:8), list dQ at block 512
                # 17.33 -> 16.89 ms with 128 x 32 tiles on 4 warps (131072:512:8)
                # session 16: blocks above 256 keys take 128-key tiles (131072:512:8 11.15 -> 10.30 ms, 131072:4096:12
                # 61.5 -> 55.2, 32768:2048:3 1.94 -> 1.78; 4 stages exceed the shared memory)
                "list_fwd": (128, 32, 4, 4) if block_size <= 256 else (128, 128, 8, 3),
                "dkdv": (32, 64, 4, 3),
                "dkdv_fused": (32, 128, 8, 3),
                "list_dq": (128, 32, 4, 3),
                "diag_dq": (128, 32, 4, 3) if small_block else (128, 64, 8, 3),
                "combine_fwd": (64, 64, 4, 3),
            }
        else:  # D <= 64 in bf16 / fp16 (the 1B training shape): wider key tiles fit 4 warps' registers
            table = {
                "list_fwd": (128, 64, 4, 3) if small_block else (128, 128, 8, 3),
                "dkdv": (32, 128, 4, 3),
                "dkdv_fused": (32, 128, 8, 2),
                "list_dq": (128, 64, 4, 3),
                "diag_dq": (64, 32, 4, 3),
                # session 15: with the one-ahead partial loads, 64-row tiles (128 rows: 3.19 -> 3.61 ms; 64: 2.99 ms
                # at 131072:512:8, 32/8 heads)
                "combine_fwd": (64, 64, 4, 3),
            }
        bm, bn, w, s = {**table, "route": (64, 32, 4, 2)}[name]
        if dtype == torch.float32 and name != "route":
            # fp32 operands split for "tf32x3" need 4x the shared memory of bf16 ones: the fused dK/dV kernel at
            # 32 x 64, 2 stages asked for 262 KB (H200 limit 227 KB); 32 x 32 tiles without pipelining fit all
            bm, bn, s = min(bm, 32), min(bn, 32), 1
    if name == "combine_fwd":  # query rows of one block: a tile taller than the block is masked rows (64 stays)
        bm = min(bm, max(64, 1 << (block_size - 1).bit_length()))
    if name != "route":  # BN keys of one block: a power of two (Triton's tiles) that divides the block
        bn = 1 << (min(bn, block_size).bit_length() - 1)
        while block_size % bn:
            bn //= 2
        bn = max(bn, 16)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
