"""Save-and-exit on SIGTERM / SIGUSR1 / SIGINT: what SLURM (``--signal``, pre-emption, time limit),
Kubernetes and torchrun send before they kill a job, and Ctrl-C. The handler only sets a flag (and says so
in the log); the loop checks it after each optimizer step (all ranks agree through one all-reduce), writes a
checkpoint and returns, so the next launch with ``resume=auto`` continues from that exact step instead of
the last periodic checkpoint. After the last step the flag stays armed through the final evaluation and the
HF export (``phase``): a signal there stops the launch before the next of them, and the next launch does
what is left (see ``train.loop.run``)."""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_installed: list[PreemptionFlag] = []  # flags whose handlers are in place, oldest first


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; ``requested(device)`` is collective (every rank must call it).
    ``phase`` (``"train"`` or a description of the final work under way) words the message on a signal;
    ``saves=False`` (``checkpoint.enabled=false``) says no checkpoint will be saved."""

    def __init__(self, saves: bool = True):
        self.hit = False
        self.saves = saves
        self.phase = "train"
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _installed.append(self)

    def _handle(self, signum, frame):
        if not self.hit:
            name = signal.Signals(signum).name
            if self.phase == "train":
                log.warning("received %s: %s", name, "saving a checkpoint after this step, then stopping" if self.saves
                            else "stopping after this step (checkpoint.enabled=false: nothing is saved)")
            else:
                log.warning("received %s during %s: stopping after it; the next launch does what is left",
                            name, self.phase)
        self.hit = True

    def requested(self, device) -> bool:
        flag = torch.tensor([1.0 if self.hit else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were in place before (once; later calls do nothing)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self in _installed:
            _installed.remove(self)


def restore_signal_handlers() -> None:
    """Restore the handlers of every flag still installed, newest first: a run that raised must not leave
    SIGINT / SIGTERM swallowed in its process (a test session, a notebook)."""
    for flag in reversed(list(_installed)):
        flag.restore()
