"""The kernels' integer arguments that count what a batch's packing makes (blocks, lists, a list range) are not
specialised by Triton, and the buffers sized by those counts keep the same pointer alignment: otherwise a new
packing whose count changes divisibility by 16 (or a buffer's alignment) compiles a new variant of the kernel
in the middle of training (seen on an H200: 128K-token steps of 4-6 s instead of 3.4 s while variants
compiled, session 7 in kernels/NOTES.md)."""

import pytest

import kernels.attention_bwd as bwd
import kernels.attention_fwd as fwd
import kernels.routing as routing

LAYOUT_COUNTS = {"NB", "NL", "LIST0", "LIST1"}  # blocks of the batch, lists, a chunk's first / end list


def jit_kernels():
    for mod in (routing, fwd, bwd):
        for name, obj in vars(mod).items():
            if hasattr(obj, "arg_names") and name.endswith("_kernel"):
                yield name, obj


def unspecialised(kernel) -> set:
    """Names of the arguments Triton does not specialise (the interpreter keeps the decorator's kwargs)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return {kernel.arg_names[a] if isinstance(a, int) else a for a in kernel.kwargs.get("do_not_specialize") or ()}


def test_layout_counts_are_not_specialised():
    checked = 0
    for name, kernel in jit_kernels():
        counts = LAYOUT_COUNTS & set(kernel.arg_names)
        assert counts <= unspecialised(kernel), f"{name}: {sorted(counts - unspecialised(kernel))} specialised"
        checked += bool(counts)
    assert checked >= 8  # every kernel that takes one of them (routing 4, forward 1, backward 3)


def specialisation(kernel, args, kwargs) -> tuple:
    """What Triton keys a launch's compiled variant by, computed from its rules: a tensor by its dtype and
    16-byte alignment, an int by whether it is 1 or a multiple of 16 (nothing for an unspecialised one), a
    constexpr and a launch option by value."""
    import inspect

    import torch

    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    params = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in options})
    skip = unspecialised(kernel)
    key = []
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            key.append((name, value))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool) and name not in skip:
            key.append((name, value == 1, value % 16 == 0))
    return tuple(key) + tuple(sorted(options.items()))


@pytest.mark.parametrize("hq,hkv,group", [
    pytest.param(2, 1, False, id="2-routing-heads"),  # lists hr * NB: a multiple of 4 or not with NB's parity
    pytest.param(3, 3, False, id="3-routing-heads"),
    pytest.param(6, 3, True, id="group-3-kv-heads"),
])
def test_a_new_packing_launches_no_new_variant(monkeypatch, hq, hkv, group):
    """Two packings of the same 256 tokens (8 and 9 blocks of 32): every kernel launch of MoBA's forward and
    backward has the same specialisation in both, so a new batch compiles nothing. The list buffers were two
    rows of one allocation, the second row starting at (HR * NB) * 4 or (HR * NB + 1) * 8 bytes: 16-byte
    aligned or not with the packing when the routing heads HR are not a multiple of 4 (14 query heads, or
    2 KV heads under group routing), a pointer alignment Triton specialises."""
    import torch

    from kernels import attention_bwd, attention_fwd, routing
    from moba_core import moba_attention

    seen: dict = {}

    def recording(lens):
        def launch(kernel, grid, *args, **kwargs):
            seen.setdefault(kernel.fn.__name__, {}).setdefault(lens, set()).add(specialisation(kernel, args, kwargs))
            real_launch(kernel, grid, *args, **kwargs)
        return launch

    real_launch = routing.launch
    for lens in ((256,), (240, 16)):
        for mod in (routing, attention_fwd, attention_bwd):
            monkeypatch.setattr(mod, "launch", recording(lens))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(256, hq, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(256, hkv, 16, generator=g, requires_grad=True) for _ in range(2))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        o = moba_attention(q, k, v, cu, max(lens), 32, 3, backend="triton", group_routing=group)
        o.backward(torch.randn(o.shape, generator=g))
    assert {"_list_pass_kernel", "_list_scan_kernel", "_list_fwd_kernel", "_dkdv_kernel"} <= set(seen)
    for name, by_lens in seen.items():
        assert len(by_lens) == 2, f"{name} ran for one packing only"
        first, second = by_lens.values()
        assert first == second, f"{name}: {sorted(first ^ second)}"
