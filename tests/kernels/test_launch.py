"""kernels.launch: the direct launch of cached compiled kernels (MOBA_FAST_LAUNCH=1), against a fake kernel that
records what Triton's path and the launcher receive."""

from types import SimpleNamespace

import pytest
import torch

from kernels import launch as L


def body(x_ptr, y_ptr, n, scale, stride=8, BLOCK: int = 16, FLAG: bool = False):
    pass


class FakeKernel:
    """A triton.jit stand-in: ``fn``, ``params`` and ``kernel[grid](...)`` (Triton's path: counted, returns a fake
    compiled kernel whose ``run`` records its arguments)."""

    def __init__(self):
        self.fn = body
        self.params = [SimpleNamespace(name=n, is_constexpr=n.isupper()) for n in
                       ("x_ptr", "y_ptr", "n", "scale", "stride", "BLOCK", "FLAG")]
        self.slow, self.runs = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return SimpleNamespace(run=lambda *a: self.runs.append(a), function="fn", packed_metadata="meta",
                                   launch_metadata=lambda *a: None)
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(L, "fast_launch_enabled", lambda: True)
    monkeypatch.setattr(L, "current_stream", lambda: (0, 1234))
    L._BOUND.clear()
    monkeypatch.setattr(L, "STATS", {"direct": 0, "triton": 0})
    yield
    L._BOUND.clear()


def test_repeat_goes_to_the_launcher_with_every_argument_in_signature_order(fast):
    k = FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    L.launch(k, (3,), x, y, 32, 0.5, BLOCK=32, num_warps=4)
    assert len(k.slow) == 1 and not k.runs  # the first call: Triton's own path
    L.launch(k, (3, 2), x, y, 32, 0.5, BLOCK=32, num_warps=4)
    assert len(k.slow) == 1 and len(k.runs) == 1
    assert L.STATS == {"direct": 1, "triton": 1}
    run = k.runs[0]
    assert run[:7] == (3, 2, 1, 1234, "fn", "meta", None)  # grid padded to 3, stream, function, metadata
    assert run[9:] == (x, y, 32, 0.5, 8, 32, False)  # positional, keyword, defaults; num_warps is not a parameter


@pytest.mark.parametrize("change,miss", [
    (dict(x=lambda x: x[1:]), True),  # 4-byte offset: no longer 16-byte aligned
    (dict(x=lambda x: x[4:]), False),  # 16-byte offset: still aligned
    (dict(x=lambda x: x.double()), True),  # another dtype
    (dict(n=33), True),  # 32 was divisible by 16
    (dict(n=1), True),  # 1 is specialised
    (dict(n=48), False),  # divisible by 16 like 32
    (dict(n=2**40), True),  # int64
    (dict(scale=0.25), False),  # floats are not specialised
    (dict(BLOCK=64), True),  # a constexpr's value
    (dict(num_warps=8), True),  # a launch option
])
def test_what_makes_a_new_specialisation(fast, change, miss):
    k = FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    base = dict(n=32, scale=0.5, BLOCK=32, num_warps=4)
    L.launch(k, (1,), x, y, base["n"], base["scale"], BLOCK=base["BLOCK"], num_warps=base["num_warps"])
    new = {**base, **{key: v for key, v in change.items() if key != "x"}}
    x2 = change["x"](x) if "x" in change else x
    L.launch(k, (1,), x2, y, new["n"], new["scale"], BLOCK=new["BLOCK"], num_warps=new["num_warps"])
    assert (len(k.slow), len(k.runs)) == ((2, 0) if miss else (1, 1))


def test_missing_argument_and_default_off(fast, monkeypatch):
    k = FakeKernel()
    with pytest.raises(TypeError, match="missing kernel argument 'scale'"):
        L.launch(k, (1,), torch.zeros(4), torch.zeros(4), 4)
    monkeypatch.undo()  # fast_launch_enabled as shipped: off without MOBA_FAST_LAUNCH=1 (and under the interpreter)
    monkeypatch.delenv("MOBA_FAST_LAUNCH", raising=False)
    assert not L.fast_launch_enabled()
    monkeypatch.setenv("MOBA_FAST_LAUNCH", "1")
    assert not L.fast_launch_enabled()  # the tests run under TRITON_INTERPRET=1
