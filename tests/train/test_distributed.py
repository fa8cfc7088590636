"""Two CPU processes (gloo) under torchrun: a DeepSpeed data-parallel run against one process."""

import os

import pytest

from train.distributed import SHM_DIR

from .conftest import read_metrics, run_train


def allreduce_buffers() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("deepspeed_allreduce_buffer_")}


def test_two_process_deepspeed_step_matches_one_process(tmp_path, data_cache):
    """dp=2 with micro-batch 1 sees the same two samples in step 1 as one process with micro-batch 2, so the
    logged step-1 loss (sum over tokens / valid tokens, reduced over ranks) is the same; training runs."""
    two = tmp_path / "dp2"
    before = allreduce_buffers()
    run_train(["train.max_steps=2", "train.micro_batch_size=1", "parallel.zero_stage=2"], two, data_cache, nproc=2)
    one = tmp_path / "dp1"
    run_train(["train.max_steps=1", "train.micro_batch_size=2"], one, data_cache)
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM each in /dev/shm) do not outlive the processes
    assert allreduce_buffers() <= before
    m2, m1 = read_metrics(two), read_metrics(one)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert m2[0]["tokens"] == m1[0]["tokens"] == 2 * 256
    assert [m["step"] for m in m2] == [1, 2]
    assert (two / "checkpoints" / "latest").read_text() == "step_00000002"


def test_shutdown_distributed_destroys_the_group_and_allows_a_new_one():
    """``shutdown_distributed`` (called when ``python -m train`` ends) destroys the group ``init_distributed``
    started; a second call is a no-op, and a later ``init_distributed`` starts a working group again."""
    import subprocess
    import sys

    code = """
import torch, torch.distributed as dist
from train.distributed import init_distributed, shutdown_distributed
init_distributed("cpu", 1)
assert dist.is_initialized() and dist.get_world_size() == 1
shutdown_distributed()
assert not dist.is_initialized()
shutdown_distributed()
init_distributed("cpu", 1)
t = torch.ones(3)
dist.all_reduce(t)
assert t.tolist() == [1.0, 1.0, 1.0]
shutdown_distributed()
assert not dist.is_initialized()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


@pytest.mark.parametrize("wait_for_all", [True, False])
def test_shutdown_waits_for_the_other_ranks_only_when_asked(monkeypatch, wait_for_all):
    """A launch every rank ends together meets at a barrier before the group is destroyed (no rank tears down
    gloo's threads while another still uses them); a rank that failed alone must not: it would wait there for
    the others until the group's timeout."""
    import torch.distributed as dist

    from train.distributed import shutdown_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    shutdown_distributed(wait_for_all=wait_for_all)
    assert calls == (["barrier", "destroy"] if wait_for_all else ["destroy"])


@pytest.mark.parametrize("code, together", [(None, True), (0, True), (143, True), (138, True), (1, False),
                                            (2, False), ("error: moba.top_k=0 ...", False), (True, False)])
def test_which_exits_end_every_rank_together(code, together):
    """Finished runs (0 / None) and runs stopped by a signal after saving (128 + signal, agreed between ranks)
    end on every rank at once; errors (1, "error: ..." texts) may be one rank's alone."""
    from train.__main__ import ended_together

    assert ended_together(code) is together


def test_a_data_error_stops_every_rank_with_its_message(tmp_path, data_cache):
    """Two ranks, a data file with a bad row: rank 0 finds it while building the caches, and every rank stops with
    ``error: ...`` naming the file and line (exit 1, no traceback), not the other rank with a lost connection."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    proc = run_train([f"data.path={bad}", "train.max_steps=1"], tmp_path / "run", data_cache, nproc=2, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count(f"error: data.path={bad}: line 2 field 'text': expected a string") == 2, err[-3000:]
    assert "(rank 0's data setup)" in err
    # torchrun prints its own ChildFailedError traceback; none comes from our code or a lost connection
    assert "train/loop.py" not in err and "train/__main__.py" not in err and "Connection" not in err
