"""``train.bench_kernels.timed_many``: each method timed in its own blocks (A B B A), with a fake clock (no GPU
needed)."""

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

    def clock(fn, n):
        out = []
        for _ in range(n):
            fn()
            out.append(durations[order[-1]])
        return out

    return fns, clock


def runs(order):
    """[(name, count)] of consecutive runs of one name."""
    out = []
    for n in order:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return [tuple(x) for x in out]


def test_blocks_go_abba_with_a_settling_warm_up_each():
    order = []
    fns, clock = fake({"full": 2.0, "moba": 2.5}, order)
    ms = bk.timed_many(fns, 3, clock)
    assert ms == {"full": 2.0, "moba": 2.5}
    # per block: SETTLE_MS (100 ms) of untimed calls, then MIN_TIMED_MS / 2 (100 ms) of timed ones
    assert runs(order) == [("full", 50 + 50), ("moba", 2 * (40 + 40)), ("full", 50 + 50)]


def test_the_settling_clock_is_left_out_and_the_median_of_both_blocks_is_taken():
    order = []
    fns, _ = fake({"a": 0, "b": 0}, order)
    # b: a slow first call (the inherited clock) then 40 ms calls; a: 1, 3, 2, 5 ms
    seq = {"a": iter([1.0, 3.0, 2.0, 5.0] * 1000), "b": iter([90.0, 40.0] + [40.0, 41.0] * 100)}

    def clock(fn, n):
        out = []
        for _ in range(n):
            fn()
            out.append(next(seq[order[-1]]))
        return out

    ms = bk.timed_many(fns, 3, clock)
    # block 1: 90 + 40 settle, then 40 + 41 + 40 timed (>= MIN_TIMED_MS / 2); block 2: 41 + 40 + 41 settle, then
    # 40 + 41 + 40 timed: the median of the six timed runs, the 90 ms call left out
    assert order.count("b") == (2 + 3) + (3 + 3)
    assert ms["b"] == 40.0
    assert ms["a"] == 3.0


def test_a_long_method_stops_at_half_its_cap_per_block():
    order = []
    fns, clock = fake({"full": 1200.0}, order)
    assert bk.timed_many(fns, 5, clock) == {"full": 1200.0}
    assert len(order) == 2 * (1 + 2)  # per block: one settling call, then 1200 + 1200 >= MAX_TIMED_MS / 2


@pytest.mark.parametrize("error, cell", [(torch.OutOfMemoryError("CUDA out of memory"), "OOM"),
                                         (ValueError("bad"), "err")])
def test_a_failing_method_is_a_cell_and_the_others_go_on(error, cell):
    order = []
    fns, clock = fake({"full": 10.0, "moba": 20.0}, order, fail={"moba": error})
    ms = bk.timed_many(fns, 3, clock)
    assert ms == {"full": 10.0, "moba": cell}
    assert order.count("moba") == 1 and order.count("full") == 2 * (10 + 10)  # 2 blocks of 100 + 100 ms
    with pytest.raises(RuntimeError, match=cell):
        bk.timed(fns["moba"], 3, clock)


def test_calls_are_timed_in_back_to_back_batches():
    """The clock gets batches of calls (queued without a synchronisation between them), sized from the last
    batch: one first call, the rest of SETTLE_MS, then MIN_TIMED_MS / 2 of timed calls, per block."""
    order, batches = [], []
    fns, clock = fake({"full": 2.0, "moba": 4.0}, order)

    def batched(fn, n):
        batches.append(n)
        return clock(fn, n)

    bk.timed_many(fns, 3, batched)
    assert batches == [1, 49, 50, 1, 24, 25, 1, 24, 25, 1, 49, 50]


def test_a_method_whose_calls_read_zero_ms_stops_settling_at_500_calls():
    order = []
    fns, clock = fake({"free": 0.0}, order)
    assert bk.timed_many(fns, 3, clock) == {"free": 0.0}
    # per block: 500 settling calls, then timed batches up to the 500-call cap
    assert len(order) == 2 * (500 + 500)


def test_cold_first_calls_run_each_point_in_a_new_process(monkeypatch):
    """``--cold``: each point's first fwd+bwd in its own process with an empty Triton cache (here on the CPU under
    the interpreter, two heads of 16); a point the worker cannot run is reported as an error text, not a number."""
    from train.bench_kernels import cold_first_calls

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (p, sec), (bad, err) = cold_first_calls(["64:16:2", "64-16-2"], heads=2, head_dim=16, timeout_s=300)
    assert p == "64:16:2" and isinstance(sec, float) and 0 < sec < 300
    assert bad == "64-16-2" and err.startswith("err: ") and "must look like [NSEQ x]SEQ_LEN:BLOCK:TOP_K" in err


def test_cold_mode_exits_1_when_a_point_fails(monkeypatch, capsys):
    """``python -m train.bench_kernels --cold``: the table names the failed point and the exit status is 1 (so
    ``launch/h200_session.sh cold`` reports it), 0 when every point ran (``cold_first_calls`` stubbed here; its
    processes are tested above)."""
    import train.bench_kernels as bk

    results = {"ok": [("64:16:2", 1.5)], "bad": [("64:16:2", 1.5), ("64-16-2", "err: must look like")]}
    for case, expect in (("ok", 0), ("bad", 1)):
        monkeypatch.setattr(bk, "cold_first_calls", lambda points, heads, head_dim, r=results[case]: r)
        assert bk.main(["--cold", "--points", "64:16:2"]) == expect
        table = capsys.readouterr().out
        assert "| 64:16:2 | 1.5 |" in table and ("| 64-16-2 | err: must look like |" in table) == (case == "bad")
