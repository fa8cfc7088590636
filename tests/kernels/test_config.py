"""``kernels.config.kernel_config``: the GPU launch table gives tiles Triton can compile for every block size."""

import pytest
import torch

import kernels.config as config

KERNELS = ("list_fwd", "combine_fwd", "dkdv", "dkdv_fused", "list_dq", "diag_dq", "route")


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (96, torch.float16),
                                            (64, torch.float32)])
def test_tiles_are_powers_of_two_and_key_tiles_divide_the_block(monkeypatch, head_dim, dtype):
    """Block sizes that are multiples of 16 but not powers of two (48, 80, 96, ...) used to give key tiles of 48
    or 80 rows (``min(BN, block_size)``), which ``tl.arange`` refuses on the GPU."""
    monkeypatch.setattr(config, "INTERPRET", False)  # the GPU table, not the interpreter's 16 x 16 tiles
    for block_size in range(16, 1025, 16):
        for name in KERNELS:
            cfg = config.kernel_config(name, block_size, head_dim, dtype)
            for key in ("BLOCK_M", "BLOCK_N"):
                assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (name, block_size, cfg)
            if name != "route":  # route tiles candidate blocks, not the keys of one block
                assert block_size % cfg["BLOCK_N"] == 0, (name, block_size, cfg)
            if name == "combine_fwd":  # a query tile no taller than needed (64 rows stay the floor)
                assert cfg["BLOCK_M"] <= max(64, 1 << (block_size - 1).bit_length())


def test_unknown_kernel_is_a_key_error(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    with pytest.raises(KeyError):
        config.kernel_config("nope", 512, 64, torch.bfloat16)
