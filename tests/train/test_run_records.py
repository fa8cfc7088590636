"""``python -m train`` keeps one run's records whole: a held run directory stops a second launch, every rank
writes into one directory, a signal never loses work (nor the final evaluation and export), a truncated
checkpoint falls back to the previous one, and the run directory keeps each launch's config."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from train.rundir import HISTORY_DIR, LOCK_NAME

from .conftest import REPO, SMALL, read_metrics, run_train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
    """A finished 2-step run (checkpoints at steps 1 and 2, evaluations at 0 and 2, the HF export); tests
    copy it and change it as a crash would have."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(["train.max_steps=2", "checkpoint.every=1", "checkpoint.export_hf=true"], run_dir, data_cache)
    (run_dir.parent / "launch.out").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_a_launch_prints_none_of_deepspeeds_start_up_lines(finished_run):
    """DeepSpeed's CPU-fallback warning, its compiler probe commands and its op-build line appeared at every
    launch; what the launch prints now is ours."""
    out = (finished_run.parent / "launch.out").read_text()
    assert "eval step 2" in out
    for noise in ("Setting accelerator to CPU", "compilers.C", "gcc ", "built successfully"):
        assert noise not in out, noise


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def eval_steps(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "eval.jsonl").read_text().splitlines() if x]


def start_train(args, run_dir, cache):
    env = {**os.environ, "MOBA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "train", *SMALL, f"hydra.run.dir={run_dir}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_launch_into_a_held_run_dir_stops_before_writing(tmp_path, data_cache):
    """The holder (here this test process, alive) is named; the second launch writes no metrics,
    checkpoints, config or wandb files."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00",
              "command": "python -m train (the first launch)"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    proc = run_train(["train.max_steps=1", "logging.wandb.mode=offline"], run_dir, data_cache, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"hydra.run.dir={run_dir} is in use" in out and f"pid {os.getpid()} on host" in out
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".log")) == [LOCK_NAME]


def test_every_rank_writes_into_rank_0s_time_stamped_run_dir(tmp_path, data_cache):
    """Two processes under torchrun, rank 1 starting 1.5 s after rank 0, no hydra.run.dir: Hydra's default
    directory would then differ by a second between the ranks; both must use one."""
    late = tmp_path / "late_rank1.py"
    late.write_text("import os, runpy, time\n"
                    "if os.environ['RANK'] == '1':\n    time.sleep(1.5)\n"
                    "runpy.run_module('train', run_name='__main__', alter_sys=True)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MOBA_CACHE": str(data_cache), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "LOCAL_SIZE": "2", "PYTHONPATH": str(REPO)}
    env.pop("MOBA_LAUNCH_TIME", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(late), *SMALL, "train.max_steps=1", "train.micro_batch_size=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dirs = sorted(p for p in (tmp_path / "runs").glob("*/*") if p.is_dir())
    assert len(dirs) == 1, dirs
    tag = dirs[0] / "checkpoints" / "step_00000001"
    assert (tag / "rng_rank0.pt").is_file() and (tag / "rng_rank1.pt").is_file()
    assert [m["step"] for m in read_metrics(dirs[0])] == [1]


def test_sigint_saves_a_checkpoint_at_the_current_step(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = start_train(["train.max_steps=500", "checkpoint.every=1000"], run_dir, data_cache)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out[-3000:]  # 128 + SIGINT
    step = read_metrics(run_dir)[-1]["step"]
    assert "received SIGINT" in out
    assert (f"stopped by a signal at step {step} (SIGINT): checkpoint saved: {run_dir / 'checkpoints'}/step_"
            f"{step:08d}; to resume from it, run python -m train with the same settings and hydra.run.dir={run_dir}"
            in out)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert not (run_dir / LOCK_NAME).exists()


def test_sigterm_after_the_last_checkpoint_stops_before_the_final_evaluation_or_export(tmp_path, data_cache):
    """SIGTERM once the last checkpoint is saved (during the final evaluation): the launch says so and stops
    before the work it has not begun, leaving it to the next launch (see the test below)."""
    run_dir = tmp_path / "run"
    args = ["train.max_steps=2", "checkpoint.every=1000", "checkpoint.export_hf=true", "train.eval_batches=5"]
    proc = start_train(args, run_dir, data_cache)
    latest = run_dir / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text() == "step_00000002", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: the stage is not complete (no hf/)
    assert "received SIGTERM" in out
    stopped = re.search(r"stopped by a signal at step 2 before the (final evaluation|HF export) \(SIGTERM\): the last "
                        r"checkpoint is (\S+); to complete the stage, run python -m train with the same settings and "
                        r"hydra.run.dir=(\S+); exit status 143\n", out)
    assert stopped, out[-3000:]
    assert stopped.group(2, 3) == (str(run_dir / "checkpoints" / "step_00000002"), str(run_dir))
    assert not (run_dir / "hf").exists() and not (run_dir / LOCK_NAME).exists()


def test_a_launch_killed_in_the_final_evaluation_or_export_is_completed(finished_run, tmp_path, data_cache):
    """As if SIGKILLed after the last checkpoint: no final evaluation line, a half-written export. A launch
    with the same settings does both; one more does nothing."""
    run_dir = copy_of(finished_run, tmp_path)
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    (run_dir / "eval.jsonl").write_text(lines[0] + "\n")
    (run_dir / "hf" / "model.safetensors").unlink()
    (run_dir / "hf" / "moba_export.json").unlink()
    args = ["train.max_steps=2", "checkpoint.every=1", "checkpoint.export_hf=true"]
    out = run_train(args, run_dir, data_cache)
    text = out.stdout + out.stderr
    assert "left undone: the final evaluation and the HF export" in text
    assert eval_steps(run_dir) == [0, 2] and (run_dir / "hf" / "model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, data_cache):
    run_dir = copy_of(finished_run, tmp_path)
    bad = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:1000])
    out = run_train(["train.max_steps=2", "checkpoint.every=1"], run_dir, data_cache)
    text = out.stdout + out.stderr
    assert str(bad) in text and "at step 1" in text
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert eval_steps(run_dir) == [0, 2]


def test_a_changed_setting_is_logged_and_every_launch_config_is_kept(finished_run, tmp_path, data_cache):
    run_dir = copy_of(finished_run, tmp_path)
    out = run_train(["train.max_steps=2", "checkpoint.every=1", "moba.top_k=2"], run_dir, data_cache)
    text = out.stdout + out.stderr
    assert "moba.top_k 3 -> 2" in text
    history = sorted((run_dir / HISTORY_DIR).iterdir())
    assert [json.loads(p.read_text())["config"]["moba"]["top_k"] for p in history] == [3, 2]
    assert json.loads((run_dir / "config.json").read_text())["moba"]["top_k"] == 2


def test_triton_on_a_cpu_is_refused_before_any_data_or_model_work(tmp_path):
    cache, run_dir = tmp_path / "empty_cache", tmp_path / "run"
    proc = run_train(["moba.backend=triton", "device=cpu", "logging.wandb.mode=offline"], run_dir, cache,
                     check=False)
    assert proc.returncode != 0
    assert "moba.backend=triton needs a CUDA device but device=cpu" in proc.stdout + proc.stderr
    assert not cache.exists() or not any(cache.iterdir())  # no tokenizer, no shards
    assert not any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "wandb", "config.json"))
