"""Process-group setup: device choice, torch.distributed through DeepSpeed, data/sequence-parallel ranks.

World = dp x sp. Sequence-parallel groups are contiguous ranks ``[i*sp, (i+1)*sp)`` (DeepSpeed's
convention); data-parallel rank = rank // sp.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    sp_size: int
    device: torch.device

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed / SLURM environment variables.

    A process started by SLURM directly (srun, or Hydra's submitit launcher: one task per GPU) gets
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from submitit's helper."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except (ImportError, RuntimeError):
            pass
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, world, local


def device_type(requested: str) -> str:
    """``device=auto|cpu|cuda`` -> ``"cpu"`` or ``"cuda"``, without touching any device (``auto``: cuda when one
    is visible)."""
    return "cpu" if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()) else "cuda"


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``device=auto|cpu|cuda`` -> a torch device. Raises ValueError for cuda without a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if device_type(requested) == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def quiet_deepspeed(requested_device: str) -> None:
    """Keep DeepSpeed's start-up chatter out of every launch's log, hiding no error. Call before deepspeed is
    first imported: on a CPU it sets ``DS_ACCELERATOR=cpu`` (else DeepSpeed warns that it fell back to the
    CPU), and the compile-and-link probes of DeepSpeed's op builders (the ``compilers.*`` loggers) print at
    INFO only; their warnings and errors still show. ``init_distributed`` drops DeepSpeed's "built
    successfully" line."""
    if requested_device == "cpu" or (requested_device == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("compilers").setLevel(logging.WARNING)


@contextlib.contextmanager
def _drop_stdout_lines(marker: str):
    """Swallow stdout lines containing ``marker`` (DeepSpeed prints its op builds); pass the rest through."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [ln for ln in buf.getvalue().splitlines(keepends=True) if marker not in ln]
        sys.stdout.write("".join(kept))


SHM_DIR = "/dev/shm"


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, 66 MB) once every rank has mapped every other rank's (a
    barrier after ``init_distributed``). DeepSpeed never unlinks it, so each CPU process left one behind in
    RAM-backed ``/dev/shm`` (20 GB after a test session); the mappings stay valid until the process exits,
    however it exits, and the memory is then freed."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    torch.distributed.barrier()  # every rank has opened the others' buffers (shm_initialize waits for them)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def shutdown_distributed(wait_for_all: bool = True) -> None:
    """Destroy the default process group, if one was started, once a launch's last job is done (the jobs of a
    Hydra multirun share one process and one group). Left to the interpreter's exit, the backend's threads
    (gloo's, NCCL's) are torn down in no fixed order: a rank could abort with "terminate called without an
    active exception" after its work was saved, and NCCL warns that ``destroy_process_group()`` was not called.

    Args:
        wait_for_all: first a barrier, so that no rank tears its threads down while another still talks to it.
            Only for a launch every rank ends together (finished, or stopped by a signal after saving): a rank
            that failed alone would wait there for the others until the group's timeout (30 minutes), where it
            should exit at once and let the launcher stop the rest.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_all:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def init_distributed(requested_device: str, sp_size: int) -> DistInfo:
    """Start torch.distributed (gloo on CPU, nccl on GPU) through DeepSpeed; works without a launcher.

    On a CPU, DeepSpeed needs ``DS_ACCELERATOR=cpu`` and ``LOCAL_SIZE``; they are set here when absent.
    """
    rank, world, local = world_from_env()
    device = pick_device(requested_device, local)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("LOCAL_SIZE", str(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    if not torch.distributed.is_initialized():
        with _drop_stdout_lines("built successfully"):  # the shared-memory op DeepSpeed builds on a CPU
            deepspeed.init_distributed(
                dist_backend="gloo" if device.type == "cpu" else "nccl", auto_mpi_discovery=False
            )
        if device.type == "cpu":
            _unlink_cpu_allreduce_buffer(rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local, sp_size=sp_size, device=device)
