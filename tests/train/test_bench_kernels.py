"""``train.bench_kernels.timed_many``: methods timed in alternating rounds, with a fake clock (no GPU needed)."""

import pytest
import torch

from train import bench_kernels as bk


def fake(durations, order, fail=None):
    """Callables that log their name into ``order``, and a clock returning each one's fixed duration (ms)."""
    fns = {}
    for name in durations:
        def fn(name=name):
            order.append(name)
            if fail and name in fail:
                raise fail[name]
        fns[name] = fn

    def clock(fn):
        fn()
        return durations[order[-1]]

    return fns, clock


def test_rounds_alternate_and_go_on_until_every_method_is_done():
    order = []
    fns, clock = fake({"full": 2.0, "moba": 2.5}, order)
    ms = bk.timed_many(fns, 3, clock)
    assert ms == {"full": 2.0, "moba": 2.5}
    assert order[:2] == ["full", "moba"]  # the warm-ups
    timed = order[2:]
    assert timed == ["full", "moba"] * (len(timed) // 2)  # strictly alternating rounds
    # full (2 ms) needs 100 runs for MIN_TIMED_MS; moba, done after 80, stays in the rounds
    assert len(timed) // 2 == 100


def test_a_long_method_leaves_at_its_cap_and_the_median_is_taken():
    order = []
    fns, _ = fake({"a": 0, "b": 0}, order)
    runs = {"a": iter([0.0] + [1.0, 3.0, 2.0, 5.0] * 100), "b": iter([0.0, 700.0, 1000.0, 1200.0, 1100.0, 7.0])}

    def clock(fn):
        fn()
        return next(runs[order[-1]])

    ms = bk.timed_many(fns, 3, clock)
    assert order[2:].count("b") == 4  # 700 + 1000 + 1200 < 3000 <= that + 1100 (MAX_TIMED_MS): no more runs of b
    assert ms["b"] == 1100.0  # median of 700, 1000, 1200, 1100 (the upper middle)
    assert order[2:].count("a") == 74 and ms["a"] == 3.0  # 1, 3, 2, 5 ms repeated: 74 runs reach 200 ms


@pytest.mark.parametrize("error, cell", [(torch.OutOfMemoryError("CUDA out of memory"), "OOM"),
                                         (ValueError("bad"), "err")])
def test_a_failing_method_is_a_cell_and_the_others_go_on(error, cell):
    order = []
    fns, clock = fake({"full": 10.0, "moba": 20.0}, order, fail={"moba": error})
    ms = bk.timed_many(fns, 3, clock)
    assert ms == {"full": 10.0, "moba": cell}
    assert order.count("moba") == 1 and order.count("full") == 21  # warm-up + 20 runs of 10 ms
    with pytest.raises(RuntimeError, match=cell):
        bk.timed(fns["moba"], 3, clock)
