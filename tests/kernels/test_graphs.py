"""CUDA graphs for short calls (``moba_core.graphs``, on unless ``MOBA_CUDA_GRAPHS=0``).

On the CPU (the interpreter) the cache, the shape key and the graphed autograd path run with a stand-in for the
capture (``_Eager``: the same static buffers, the function re-run at each replay), against the eager path and
the reference; the real capture and replay are checked on the GPU (``-m gpu``)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from kernels.config import INTERPRET
from moba_core import graphs, moba_attention
from moba_core import triton_backend as tb
from tests.kernels.test_triton_moba import make_inputs


class _Eager(graphs._Graphed):
    """``_Graphed`` without CUDA: "replay" runs the captured function again on the static buffers."""

    captures = 0

    def _capture(self, fn, device):
        type(self).captures += 1
        self.fn = fn
        self._replay()

    def _replay(self):
        with torch.no_grad():
            self.static_out = self.fn(*self.static_in)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Graphs "enabled" on the CPU through ``_Eager``, with an empty cache before and after."""
    monkeypatch.setattr(graphs, "_Graphed", _Eager)
    monkeypatch.setattr(tb, "graphs_enabled", lambda q: True)
    _Eager.captures = 0
    graphs.GRAPHS.clear()
    yield graphs.GRAPHS
    graphs.GRAPHS.clear()


def test_cache_captures_on_the_second_sighting_and_drops_the_least_recent():
    cache = graphs.GraphCache(size=2, seen_size=3)
    assert not cache.ready("a") and cache.ready("a") and cache.has("a")
    assert not cache.ready("b") and cache.ready("b")
    assert cache.ready("a")  # "a" becomes the most recent
    assert not cache.ready("c") and cache.ready("c")  # a third key drops "b", the least recent
    assert cache.has("a") and cache.has("c") and not cache.has("b")
    for key in ("d", "e", "f", "g"):  # seen-once keys are bounded too: "d" is forgotten
        assert not cache.ready(key)
    assert not cache.ready("d") and cache.ready("g")
    with pytest.raises(KeyError):
        cache.run("b", "fwd", lambda: [], [])


def test_graphs_enabled_reads_its_settings(monkeypatch):
    q = torch.zeros(8, 1, 16)
    monkeypatch.delenv("MOBA_CUDA_GRAPHS", raising=False)  # on by default, but
    assert not graphs.graphs_enabled(q)  # CPU tensors are never graphed
    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "1")
    assert not graphs.graphs_enabled(q)  # CPU tensors are never graphed
    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="MOBA_CUDA_GRAPHS must be 0 or 1, got 'yes'"):
        graphs.graphs_enabled(q)
    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "0")
    for bad in ("0", "-5", "16k"):
        monkeypatch.setenv("MOBA_CUDA_GRAPH_MAX_TOKENS", bad)
        with pytest.raises(ValueError, match="MOBA_CUDA_GRAPH_MAX_TOKENS must be a positive integer"):
            graphs.graphs_enabled(q)


def test_moba_environment_is_the_moba_variables_of_os_environ(monkeypatch):
    """``graphs.moba_environment`` reads os.environ's raw mapping: the same variables as a scan of os.environ."""
    monkeypatch.setenv("MOBA_TEST_SETTING", "x=1")
    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "1")
    monkeypatch.setenv("NOT_MOBA_TEST", "2")
    got = {(n.decode() if isinstance(n, bytes) else n, v.decode() if isinstance(v, bytes) else v)
           for n, v in graphs.moba_environment()}
    want = {(n, v) for n, v in os.environ.items() if n.startswith("MOBA_") and not n.startswith("MOBA_CUDA_GRAPH")}
    assert got == want and ("MOBA_TEST_SETTING", "x=1") in got
    monkeypatch.setenv("MOBA_TEST_SETTING", "x=2")
    assert ("MOBA_TEST_SETTING", "x=2") in {(n.decode(), v.decode()) if isinstance(n, bytes) else (n, v)
                                           for n, v in graphs.moba_environment()}


def test_shape_key_covers_the_settings_the_capture_depends_on(monkeypatch):
    q, k = torch.zeros(96, 4, 16), torch.zeros(96, 2, 16)
    base_args = dict(q=q, k=k, lens=[64, 32], block_size=16, top_k=3, scale=0.25, group_routing=False)
    base = graphs.graph_key(**base_args)
    assert base == graphs.graph_key(**base_args)
    changes = [dict(lens=[32, 64]), dict(block_size=32), dict(top_k=2), dict(scale=0.5), dict(group_routing=True),
               dict(q=q.half()), dict(k=torch.zeros(96, 4, 16))]
    others = [graphs.graph_key(**{**base_args, **change}) for change in changes]
    monkeypatch.setenv("MOBA_DENSE_PATH", "0")
    others.append(graphs.graph_key(**base_args))
    monkeypatch.delenv("MOBA_DENSE_PATH")
    torch.use_deterministic_algorithms(True)
    try:
        others.append(graphs.graph_key(**base_args))
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("MOBA_CUDA_GRAPH_MAX_TOKENS", "4096")  # the graph settings themselves are not in the key
    assert graphs.graph_key(**base_args) == base
    assert len({base, *others}) == len(others) + 1


def _fwd_bwd(q, k, v, do, cu, max_len, backend, bs=16, top_k=3):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = moba_attention(*leaves, cu, max_len, bs, top_k, backend=backend)
    o.backward(do)
    return [o.detach(), *(x.grad for x in leaves)]


@pytest.mark.parametrize("lens", [pytest.param([96], id="one-doc"), pytest.param([70, 0, 58], id="packed")])
def test_graphed_calls_match_eager_and_reference_with_new_values_each_call(cpu_graphs, lens):
    """Three calls of one shape (eager, capture, replay), each with new values: each equals the eager path and
    the reference; a replay must not return a former call's outputs."""
    for seed in range(3):
        q, k, v, do, cu, max_len = make_inputs(lens, 4, 2, 16, torch.float32, seed=seed)
        got = _fwd_bwd(q, k, v, do, cu, max_len, "triton")
        graphed = cpu_graphs.has(graphs.graph_key(q, k, lens, 16, 3, 16 ** -0.5, False))
        assert graphed == (seed > 0)
        with torch.no_grad():
            assert torch.equal(moba_attention(q, k, v, cu, max_len, 16, 3, backend="triton"), got[0])
        ref = _fwd_bwd(q, k, v, do, cu, max_len, "reference")
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=f"{name}, call {seed}")
    assert _Eager.captures == 2  # the forward and the backward, once each


def test_backward_after_its_graphs_were_dropped_runs_eagerly(cpu_graphs):
    lens = [80]
    q, k, v, do, cu, max_len = make_inputs(lens, 2, 2, 16, torch.float32, seed=3)
    _fwd_bwd(q, k, v, do, cu, max_len, "triton")  # seen once
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = moba_attention(*leaves, cu, max_len, 16, 3, backend="triton")  # graphed forward
    cpu_graphs.clear()
    o.backward(do)
    ref = _fwd_bwd(q, k, v, do, cu, max_len, "reference")
    for a, b in zip([x.grad for x in leaves], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device and TRITON_INTERPRET=0")
def test_cuda_graphs_replay_equals_eager_on_the_gpu(monkeypatch):
    """Real capture and replay: calls of two shapes interleaved, new values each call, fwd+bwd and no-grad, equal to
    the eager path (dQ of small blocks is summed with atomics: last-bit differences allowed)."""
    from torch.utils.checkpoint import checkpoint

    graphs.GRAPHS.clear()
    shapes = [([4096, 4096], 512, 3), ([3000, 5192], 256, 4)]
    for rep in range(3):
        for lens, bs, top_k in shapes:
            g = torch.Generator(device="cuda").manual_seed(rep)
            T = sum(lens)
            q, k, v, do = (torch.randn(T, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
            k, v = k[:, :4], v[:, :4]
            cu = torch.tensor([0, lens[0], T], dtype=torch.int32, device="cuda")
            runs = {}
            for mode in ("0", "1"):
                monkeypatch.setenv("MOBA_CUDA_GRAPHS", mode)
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                call = functools.partial(moba_attention, cu_seqlens=cu, max_seqlen=max(lens), block_size=bs,
                                         top_k=top_k, backend="triton")
                o = checkpoint(call, *leaves, use_reentrant=False)
                o.backward(do)
                with torch.no_grad():
                    o2 = moba_attention(q, k, v, cu, max(lens), bs, top_k, backend="triton")
                runs[mode] = [o.detach(), o2, *(x.grad for x in leaves)]
            for name, a, b in zip(("o", "o no-grad", "dq", "dk", "dv"), runs["0"], runs["1"]):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, msg=f"{name} {lens} rep {rep}")
                if name.startswith("o"):  # each query's output is computed alone: no atomics in the forward
                    assert torch.equal(a, b), f"{name} {lens} rep {rep}"
    assert len(graphs.GRAPHS.entries) == 2
    graphs.GRAPHS.clear()


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device and TRITON_INTERPRET=0")
def test_cuda_graph_replays_on_two_streams_keep_their_inputs(monkeypatch):
    """A replay issued on a side stream right after one on the current stream must not overwrite the static inputs
    the first is still reading (without the graph's event the two share its buffers at once)."""
    bs, top_k = 512, 3
    cu = torch.tensor([0, 8192], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = ([torch.randn(8192, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]
            for _ in range(2))

    def call(x):
        with torch.no_grad():
            return moba_attention(*x, cu, 8192, bs, top_k, backend="triton")

    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "0")
    want_a, want_b = call(a), call(b)
    monkeypatch.setenv("MOBA_CUDA_GRAPHS", "1")
    graphs.GRAPHS.clear()
    call(a), call(a)  # seen, then captured
    side = torch.cuda.Stream()
    for _ in range(5):
        got_a = call(a)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got_b = call(b)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    graphs.GRAPHS.clear()
