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
