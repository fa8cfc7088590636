"""Save-and-exit on SIGTERM / SIGUSR1 / SIGINT: what SLURM (``--signal``, pre-emption, time limit),
Kubernetes and torchrun send before they kill a job, and Ctrl-C. The handler only sets a flag (and says so
in the log); the loop checks it after each optimizer step (all ranks agree through one all-reduce), writes a
checkpoint and returns, so the next launch with ``resume=auto`` continues from that exact step instead of
the last periodic checkpoint. After the last step the flag stays armed through the final evaluation and the
HF export (``phase``): a signal there stops the launch before the next of them, and the next launch does
what is left (see ``train.loop.run``). A launch stopped this way exits with ``exit_status(signum)`` (128 +
the signal number: 130 for SIGINT, 143 for SIGTERM; ``train.__main__``), so a script that chains stages
(``make train``) stops instead of starting the next stage without this one's output."""

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
    ``saves=False`` (``checkpoint.enabled=false``) says no checkpoint will be saved. ``signum`` is the number
    of the first signal received (on a rank that received none, the largest any rank received, once
    ``requested`` has returned True); None before any."""

    def __init__(self, saves: bool = True):
        self.hit = False
        self.signum: int | None = None
        self.saves = saves
        self.phase = "train"
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _installed.append(self)

    def _handle(self, signum, frame):
        if not self.hit:
            self.signum = signum
            name = signal.Signals(signum).name
            if self.phase == "train":
                log.warning("received %s: %s", name, "saving a checkpoint after this step, then stopping" if self.saves
                            else "stopping after this step (checkpoint.enabled=false: nothing is saved)")
            else:
                log.warning("received %s during %s: stopping after it; the next launch does what is left",
                            name, self.phase)
        self.hit = True

    def requested(self, device) -> bool:
        flag = torch.tensor([float(self.signum or 0)], device=device)  # signal numbers are positive
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())  # another rank's signal: every rank exits with the same status
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were in place before (once; later calls do nothing)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self in _installed:
            _installed.remove(self)


def exit_status(signum: int) -> int:
    """The exit status of a launch stopped by signal ``signum`` after saving: 128 + ``signum``, the shell's
    convention for a process ended by a signal (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(signum)


def describe(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself for a signal Python does not name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def restore_signal_handlers() -> None:
    """Restore the handlers of every flag still installed, newest first: a run that raised must not leave
    SIGINT / SIGTERM swallowed in its process (a test session, a notebook)."""
    for flag in reversed(list(_installed)):
        flag.restore()
