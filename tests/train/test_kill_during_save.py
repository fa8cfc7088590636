"""Crash safety: a training process killed with SIGKILL in the middle of saving a checkpoint leaves the previous
checkpoint loadable, and ``resume=auto`` continues from it."""

import json
import os
import signal
import subprocess
import sys
import time

from train.checkpoint import latest_tag

from .conftest import REPO, SMALL, read_metrics, run_train, small_data_args

# Runs python -m train with the save of step 2 held just after DeepSpeed wrote its files (before this rank's
# RNG file, the manifest and ``latest``): a file says so, and the process waits there to be killed.
HOLD = """
import runpy, sys, time
from pathlib import Path
import train.checkpoint as c
flag, orig = Path(sys.argv[1]), c._rng_state
def held():
    if (flag.parent / "run" / "checkpoints" / "step_00000002").is_dir():
        flag.write_text("saving step 2")
        time.sleep(600)
    return orig()
c._rng_state = held
sys.argv = ["train", *sys.argv[2:]]
runpy.run_module("train", run_name="__main__")
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_corpus):
    run_dir, flag = tmp_path / "run", tmp_path / "saving"
    same = [*small_data_args(small_corpus), "data.packing=pad", "train.max_steps=3", "checkpoint.every=1",
            "checkpoint.keep=0"]
    args = [*SMALL, f"hydra.run.dir={run_dir}", *same]
    env = {**os.environ, "MOBA_CACHE": str(small_corpus[1]), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(flag), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the save of step 2 never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "step_00000002").is_dir()  # half saved
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert latest_tag(ckpt) == "step_00000001"

    out = run_train(same, run_dir, small_corpus[1])
    log = out.stdout + out.stderr
    assert f"resumed from {ckpt / 'step_00000001'} at step 1" in log
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]  # step 2 of the killed launch: dropped / redone
    assert (ckpt / "latest").read_text() == "step_00000003"
    assert json.loads((ckpt / "step_00000002" / "manifest.json").read_text())  # saved again, completely
