"""The kernels' integer arguments that count what a batch's packing makes (blocks, lists, a list range) are not
specialised by Triton: otherwise a new packing whose count changes divisibility by 16 compiles a new variant of
the kernel in the middle of training (seen on an H200: 128K-token steps of 4-6 s instead of 3.4 s while
variants compiled, session 7 in kernels/NOTES.md)."""

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
