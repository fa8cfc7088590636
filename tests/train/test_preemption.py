"""The save-and-exit signal handlers are put back however a run ends (a run that raises must not leave SIGINT /
SIGTERM swallowed in its process); a launch stopped by a signal says what it saved and how to resume, and exits
with 128 + the signal's number."""

import logging
import signal

import pytest

from train import loop
from train.preemption import SIGNALS, PreemptionFlag, exit_status


def test_a_run_that_raises_puts_the_signal_handlers_back(monkeypatch):
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def failing_run(*args):
        PreemptionFlag()  # installed by the loop, which then fails before it restores them
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
        raise RuntimeError("a step failed")

    monkeypatch.setattr(loop, "_run", failing_run)
    with pytest.raises(RuntimeError, match="a step failed"):
        loop.run(None, None, {})
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before


def test_restore_is_idempotent():
    before = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag()
    flag.restore()
    flag.restore()
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("saves,message", [(True, "received SIGTERM: saving a checkpoint after this step"),
                                           (False, "received SIGTERM: stopping after this step (checkpoint.enabled"
                                                   "=false: nothing is saved)")])
def test_the_signal_message_says_whether_a_checkpoint_is_saved(caplog, saves, message):
    flag = PreemptionFlag(saves=saves)
    try:
        with caplog.at_level(logging.WARNING, logger="train.preemption"):
            flag._handle(signal.SIGTERM, None)
    finally:
        flag.restore()
    assert flag.hit and message in caplog.text


def test_the_flag_keeps_the_first_signal_and_its_exit_status():
    flag = PreemptionFlag()
    try:
        assert flag.signum is None and not flag.requested("cpu")
        flag._handle(signal.SIGINT, None)
        flag._handle(signal.SIGTERM, None)
    finally:
        flag.restore()
    assert flag.signum == signal.SIGINT and flag.requested("cpu")
    assert [exit_status(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)] == [130, 143, 138]


@pytest.mark.parametrize("checkpoint,resume,before,expected", [
    pytest.param("r/checkpoints/step_00000007", "auto", None,
                 "stopped by a signal at step 7 (SIGTERM): checkpoint saved: r/checkpoints/step_00000007; to resume "
                 "from it, run python -m train with the same settings and hydra.run.dir=r; exit status 143",
                 id="saved"),
    pytest.param("r/checkpoints/step_00000007", "none", None,
                 "stopped by a signal at step 7 (SIGTERM): checkpoint saved: r/checkpoints/step_00000007; to resume "
                 "from it, run python -m train with the same settings and hydra.run.dir=r resume=auto; exit status "
                 "143", id="resume-none"),
    pytest.param("r/checkpoints/step_00000007", "auto", "the HF export",
                 "stopped by a signal at step 7 before the HF export (SIGTERM): the last checkpoint is "
                 "r/checkpoints/step_00000007; to complete the stage, run python -m train with the same settings and "
                 "hydra.run.dir=r; exit status 143", id="before-export"),
    pytest.param(None, "auto", None,
                 "stopped by a signal at step 7 (SIGTERM): checkpoint.enabled=false: nothing saved, so python -m "
                 "train with the same settings and hydra.run.dir=r starts from scratch; exit status 143",
                 id="nothing-saved"),
])
def test_the_stop_message_names_the_signal_the_checkpoint_and_how_to_resume(checkpoint, resume, before, expected):
    from pathlib import Path

    ckpt = Path(checkpoint) if checkpoint else None
    assert loop.stop_message(signal.SIGTERM, 7, ckpt, Path("r"), resume, before) == expected


# ``python -m train`` with the training loop replaced by one that reports a stop by ``signal`` (None: a run that
# finished); each call appends its run directory to the file ``sys.argv[1]``.
FAKE_RUN = """import runpy, sys
import train.loop
calls, signum = sys.argv[1], sys.argv[2]
def run(cfg, run_dir, config_dict):
    with open(calls, "a") as f:
        f.write(str(run_dir) + "\\n")
    return {"step": 3, "preempted": True, "signal": int(signum)} if signum != "none" else {"step": 3}
train.loop.run = run
sys.argv = ["train", *sys.argv[3:]]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def fake_train(tmp_path, signum, *overrides):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "calls"), str(signum), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return proc, calls


@pytest.mark.parametrize("signum,status", [pytest.param(signal.SIGINT, 130, id="SIGINT"),
                                           pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
                                           pytest.param("none", 0, id="finished")])
def test_a_launch_stopped_by_a_signal_exits_with_128_plus_its_number(tmp_path, signum, status):
    """It used to exit 0, so make train went on to its second stage, which then failed for want of the first
    stage's export. The run directory is released all the same."""
    from train.rundir import LOCK_NAME

    run_dir = tmp_path / "run"
    proc, calls = fake_train(tmp_path, int(signum) if signum != "none" else signum, f"hydra.run.dir={run_dir}")
    assert proc.returncode == status, proc.stderr[-3000:]
    assert calls == [str(run_dir)] and not (run_dir / LOCK_NAME).exists()


def test_a_signal_stops_a_sweep_before_its_next_job(tmp_path):
    proc, calls = fake_train(tmp_path, int(signal.SIGTERM), "-m", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert calls == [str(tmp_path / "sweep" / "0_seed=1")]
