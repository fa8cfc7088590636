"""Kernel launches with less host work than ``kernel[grid](...)`` (opt-in: ``MOBA_FAST_LAUNCH=1``).

Each ``kernel[grid](*args, **kwargs)`` of Triton 3.6 binds the ~40 arguments of our kernels, specialises
every one of them, builds a string cache key from the result and looks the compiled kernel up: about 65 us
of host time per launch on the H200 machine (``kernels/NOTES.md``), which makes a short sequence (8K tokens,
~15 launches per fwd+bwd) host-bound. ``launch`` keys the compiled kernel by a cheaper tuple that is at least
as fine as Triton's specialisation (per tensor: dtype and 16-byte alignment; per int: whether it is 1,
divisible by 16, and which integer type holds it; per other value: its type; constexprs and launch options:
their values) and, on a hit, calls the compiled kernel's launcher directly. A miss goes through Triton's own
path, which compiles or finds the kernel, launches it and returns it for the cache.

Off by default and under ``TRITON_INTERPRET=1``; used only with a Triton version in ``TESTED_TRITON``.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

from .config import INTERPRET

TESTED_TRITON = ("3.6",)  # major.minor versions whose JIT launch path the direct launch reproduces
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # kwargs that are not kernel parameters
_INT32, _INT64 = (-(2**31), 2**31), (-(2**63), 2**63)


def fast_launch_enabled() -> bool:
    """``MOBA_FAST_LAUNCH=1`` on a GPU with a tested Triton version (see ``TESTED_TRITON``)."""
    return (os.environ.get("MOBA_FAST_LAUNCH") == "1" and not INTERPRET
            and ".".join(triton.__version__.split(".")[:2]) in TESTED_TRITON)


def arg_key(value) -> tuple:
    """The part of the cache key for one runtime argument (at least as fine as Triton's specialisation)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return (bool, value)
    if isinstance(value, int):
        return (int, value == 1, value % 16 == 0, _INT32[0] <= value < _INT32[1], _INT64[0] <= value < _INT64[1])
    return (type(value),)


class _Bound:
    """One kernel's parameters in signature order: which are constexprs, and their defaults."""

    def __init__(self, kernel):
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        self.constexpr = {p.name for p in kernel.params if p.is_constexpr}
        self.cache: dict = {}

    def bind(self, args, kwargs) -> list:
        """All parameter values in signature order (positional, then keyword, then defaults).

        Raises:
            TypeError: a parameter is missing.
        """
        out = list(args)
        for name in self.names[len(args):]:
            if name in kwargs:
                out.append(kwargs[name])
            elif name in self.defaults:
                out.append(self.defaults[name])
            else:
                raise TypeError(f"missing kernel argument {name!r}")
        return out

    def key(self, values: list, options: tuple) -> tuple:
        return options + tuple(v if n in self.constexpr else arg_key(v) for n, v in zip(self.names, values))


_BOUND: dict[int, _Bound] = {}
STATS = {"direct": 0, "triton": 0}  # launches since import with fast launch on: direct hits, Triton's own path


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; with ``fast_launch_enabled()`` a repeat of a cached specialisation
    goes straight to the compiled kernel's launcher.

    Args:
        kernel: a ``triton.jit`` function; grid: up to three ints (program counts); args / kwargs: its
            arguments, launch options (``num_warps``, ``num_stages``) among the kwargs.
    """
    if not fast_launch_enabled():
        kernel[grid](*args, **kwargs)
        return
    bound = _BOUND.get(id(kernel))
    if bound is None:
        bound = _BOUND[id(kernel)] = _Bound(kernel)
    params = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    options = tuple((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs)
    values = bound.bind(args, params)
    device, stream = current_stream()
    key = (device, *bound.key(values, options))
    compiled = bound.cache.get(key)
    if compiled is None:
        STATS["triton"] += 1
        bound.cache[key] = kernel[grid](*args, **kwargs)  # Triton's path: compiles or finds, launches, returns
        return
    STATS["direct"] += 1
    from triton import knobs

    g = tuple(grid) + (1,) * (3 - len(grid))
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(g, stream, *values), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *values)


def current_stream() -> tuple[int, int]:
    """(device index, raw handle of its current stream), as Triton's launch path reads them."""
    from triton.runtime import driver

    device = driver.active.get_current_device()
    return device, driver.active.get_current_stream(device)
