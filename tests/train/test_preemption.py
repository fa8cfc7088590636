"""The save-and-exit signal handlers are put back however a run ends: a run that raises must not leave
SIGINT / SIGTERM swallowed in its process."""

import logging
import signal

import pytest

from train import loop
from train.preemption import SIGNALS, PreemptionFlag


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
