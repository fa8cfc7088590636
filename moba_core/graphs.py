"""CUDA graphs for short MoBA calls of the Triton backend (on by default; ``MOBA_CUDA_GRAPHS=0`` turns them off).

A short call (8K tokens: ~1.5 ms of kernels per fwd+bwd) is bound by the host: its ~20 launches and the Python
around them took 2.9-3.4 ms per fwd+bwd on the H200 machine of session 12, and the forward alone 0.62-0.84 ms
of host time against 0.54 ms replayed from a CUDA graph (``kernels/NOTES.md``, session 12). Here the whole
forward (routing, sparse kernels, dense prefixes) and the whole backward of one call shape are captured once
each and replayed: the host then issues a few copies and one graph launch per call.

Every kernel of the Triton backend is launched over host-known upper bounds and reads its counts from device
memory (no host sync after ``cu_seqlens`` is read), so a call is capturable once its shape is fixed. The
shape key (``graph_key``) holds everything the captured work depends on: q / k shapes, dtype, device, the
document lengths, ``block_size``, ``top_k``, ``softmax_scale``, ``group_routing``, deterministic mode and the
``MOBA_*`` environment. A key is captured the second time it is seen (a training run whose packing changes
every step pays one extra forward and backward per step and layout, then every further layer replays), at most
``GRAPH_CACHE_SIZE`` keys are kept (least recently used dropped, with their memory).

Inputs are copied into the graph's static buffers and outputs cloned out (about 20 us per 32 MB tensor on an
H200), so a replay never aliases another call's tensors. A call on another CUDA stream than the key's last replay
waits for that replay first (one event per graph): two streams never share the static buffers at once. Memory
per key: the static inputs and outputs plus the call's temporaries (estimated ~0.7 GiB at 8K tokens, 16 heads,
head dim 128), which is why only calls of at most ``MOBA_CUDA_GRAPH_MAX_TOKENS`` tokens (default 16384) are
graphed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch

GRAPH_CACHE_SIZE = 4  # shape keys whose graphs are kept
_SEEN_SIZE = 64  # shape keys remembered as seen once


def graphs_enabled(q: torch.Tensor) -> bool:
    """Whether this call may be graphed: ``MOBA_CUDA_GRAPHS`` 1 (the default), q on a CUDA device, at most
    ``MOBA_CUDA_GRAPH_MAX_TOKENS`` tokens (default 16384), not inside ``torch.compile``'s tracing, and no capture
    already running on this stream.

    Raises:
        ValueError: ``MOBA_CUDA_GRAPHS`` not 0 / 1, or ``MOBA_CUDA_GRAPH_MAX_TOKENS`` not a positive integer.
    """
    flag = os.environ.get("MOBA_CUDA_GRAPHS", "1").strip()
    if flag not in ("0", "1"):
        raise ValueError(f"MOBA_CUDA_GRAPHS must be 0 or 1, got {flag!r}")
    raw = os.environ.get("MOBA_CUDA_GRAPH_MAX_TOKENS", "16384").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MOBA_CUDA_GRAPH_MAX_TOKENS must be a positive integer, got {raw!r}")
    return (flag == "1" and q.device.type == "cuda" and q.shape[0] <= int(raw)
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def moba_environment() -> tuple:
    """The ``MOBA_*`` environment variables (name, value) but ``MOBA_CUDA_GRAPH*``, sorted: the settings a captured
    call may depend on. Read from ``os.environ``'s underlying mapping where it is a plain dict (POSIX: bytes keys),
    which skips decoding every variable: about 5 instead of 36 us per call on a 35-variable environment, paid by
    every graphed call."""
    raw = getattr(os.environ, "_data", None)
    if os.supports_bytes_environ and isinstance(raw, dict):
        return tuple(sorted(kv for kv in raw.items()
                            if kv[0][:5] == b"MOBA_" and not kv[0].startswith(b"MOBA_CUDA_GRAPH")))
    return tuple(sorted((n, v) for n, v in os.environ.items()
                        if n.startswith("MOBA_") and not n.startswith("MOBA_CUDA_GRAPH")))


def graph_key(q, k, lens, block_size: int, top_k: int, scale: float, group_routing: bool) -> tuple:
    """The shape key of a call: everything its captured work depends on besides the values of q, k, v."""
    return (tuple(q.shape), tuple(k.shape), q.dtype, q.device, tuple(lens), block_size, top_k, float(scale),
            bool(group_routing), torch.are_deterministic_algorithms_enabled(), moba_environment())


def _static_like(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.empty(x.shape, device=x.device, dtype=x.dtype)


class _Graphed:
    """One captured function: static input buffers, the graph, and its static outputs.

    ``fn(*static_inputs)`` must return a list of tensors (or None entries) and launch only capturable work.
    Capture: one warm-up call on a side stream (kernels compiled, dense-path plans built, allocator warmed),
    then the capture. ``__call__`` copies the inputs in, replays and returns clones of the outputs.
    """

    def __init__(self, fn: Callable, inputs: list):
        self.static_in = [_static_like(x) for x in inputs]
        self._done = None  # event recorded after each replay's clones (set by the CUDA capture)
        self._copy_in(inputs)
        self._capture(fn, inputs[0].device)

    def _capture(self, fn: Callable, device: torch.device) -> None:
        self.device = device
        self._done = torch.cuda.Event()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            fn(*self.static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pinning, a communication thread) neither fail
        # nor invalidate this capture
        with torch.no_grad(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = fn(*self.static_in)

    def _replay(self) -> None:
        self.graph.replay()

    def _copy_in(self, inputs: list) -> None:
        for dst, src in zip(self.static_in, inputs):
            if dst is not None:
                dst.copy_(src)

    def __call__(self, inputs: list) -> list:
        stream = None
        if self._done is not None:
            # a replay issued on another stream must have read its inputs and had its outputs cloned first
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self._done)
        self._copy_in(inputs)
        self._replay()
        out = [None if x is None else x.clone() for x in self.static_out]
        if stream is not None:
            self._done.record(stream)
        return out


class GraphCache:
    """Shape key -> captured forward and backward, least recently used dropped beyond ``size`` keys; a key is
    captured the second time ``ready`` sees it."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE, seen_size: int = _SEEN_SIZE):
        self.size, self.seen_size = size, seen_size
        self.entries: OrderedDict = OrderedDict()  # key -> {"fwd": _Graphed | None, "bwd": _Graphed | None}
        self.seen: OrderedDict = OrderedDict()  # keys seen once

    def ready(self, key) -> bool:
        """True when ``key`` has an entry or is seen for the second time (it gets one, the oldest may go)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        if key not in self.seen:
            self.seen[key] = None
            if len(self.seen) > self.seen_size:
                self.seen.popitem(last=False)
            return False
        del self.seen[key]
        self.entries[key] = {"fwd": None, "bwd": None}
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return True

    def has(self, key) -> bool:
        """Whether ``key`` has an entry (a backward whose key was dropped since its forward runs eagerly)."""
        return key in self.entries

    def run(self, key, part: str, fn: Callable, inputs: list) -> list:
        """``fn(*inputs)`` through the graph of ``key``'s ``part`` ("fwd" or "bwd"), captured on first use.

        Raises:
            KeyError: ``key`` has no entry (neither ``ready`` nor ``has`` returned True for it).
        """
        entry = self.entries[key]
        if entry[part] is None:
            entry[part] = _Graphed(fn, inputs)
        return entry[part](inputs)

    def clear(self) -> None:
        self.entries.clear()
        self.seen.clear()


GRAPHS = GraphCache()
