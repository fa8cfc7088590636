"""The launch scripts hand every rank the same run directory (and what the launcher needs), checked
without starting a job."""

import os
import re
import subprocess

from .conftest import REPO


def test_deepspeed_launcher_fixes_one_run_dir_and_passes_no_local_rank():
    """DeepSpeed's launcher has no store to share rank 0's start time through, and would pass --local_rank
    (which Hydra refuses): the script fixes the time-stamped run dir once and turns the argument off."""
    env = {**os.environ, "DEEPSPEED": "echo", "HOSTFILE": "hosts"}
    script = str(REPO / "launch" / "deepspeed_hostfile.sh")
    out = subprocess.run([script, "parallel.sp_size=2"], env=env, capture_output=True, text=True, check=True).stdout
    assert "--no_local_rank --module train parallel.sp_size=2 hydra.run.dir=runs/" in out
    assert re.search(r"hydra\.run\.dir=runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d$", out.strip())
    out = subprocess.run([script, "hydra.run.dir=runs/mine"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("--module train hydra.run.dir=runs/mine")


def test_slurm_script_gives_every_node_one_launch_time():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    assert text.index("export MOBA_LAUNCH_TIME=") < text.index("srun --")


def test_repro_small_runs_the_projects_python_with_every_extra_override(tmp_path):
    """launch/repro_small.sh takes the checkout's .venv/bin/python (not the first ``python`` on PATH, which
    need not have the project), and every override of EXTRA reaches both runs, also when EXTRA spans lines
    (``read`` kept only its first line)."""
    import shutil

    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch" / "repro_small.sh", tmp_path / "launch")
    for d in (tmp_path / ".venv" / "bin", tmp_path / "bin"):
        d.mkdir(parents=True)
    venv_py, bare_py = tmp_path / ".venv" / "bin" / "python", tmp_path / "bin" / "python"
    venv_py.write_text('#!/bin/sh\necho "venv python $*"\n')
    bare_py.write_text('#!/bin/sh\necho "bare python $*"\nexit 3\n')
    venv_py.chmod(0o755)
    bare_py.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "STEPS": "2", "ROOT": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "out"), "EXTRA": "model.num_layers=2 data.seq_len=1024\n  train.micro_batch_size=1"}
    env.pop("PY", None)
    proc = subprocess.run(["bash", str(tmp_path / "launch" / "repro_small.sh")], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for run in ("full", "moba"):
        log = (tmp_path / "out" / "repro" / f"{run}_train.log").read_text()
        assert log.startswith("venv python -m train ")
        assert "data.seq_len=1024 train.micro_batch_size=1" in log
