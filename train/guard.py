"""The non-finite guard: an optimizer step whose loss or gradients are not finite (NaN / inf) is skipped.

``NonFiniteGuard`` wraps the torch optimizer's ``step`` (the one DeepSpeed calls under every ZeRO stage,
after it has reduced and clipped the gradients): when a micro-batch loss of the step was not finite, or a
gradient it is about to apply is not finite, on any rank, it applies nothing, and ``end_step`` puts the
LR schedule back where it was (DeepSpeed steps it after every optimizer step). Parameters and optimizer
states stay those of the last good step. The loop logs the step as skipped; after more than
``train.max_skipped_steps`` skipped steps in a row it stops without saving (``NonFiniteError``), so the last
checkpoint it saved is the last good one.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Raised when more than ``train.max_skipped_steps`` consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Skips optimizer updates of steps with a non-finite loss or gradient; counts them.

    Args:
        optimizer: the torch optimizer given to DeepSpeed (its ``step`` is wrapped in place).
        device: where the all-reduced flag lives (every rank takes the same decision).
    Create it before the LR scheduler (which wraps ``step`` too). Per optimizer step: ``see_loss(loss)`` for
    each micro-batch, then (after DeepSpeed's step at the accumulation boundary) ``end_step(scheduler)`` ->
    True when the step was skipped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer, self.device = optimizer, device
        self.loss_bad = False
        self.decided: bool | None = None  # this step's decision (None until the optimizer's first step call)
        self.in_row = 0  # consecutive skipped steps
        self.total = 0  # skipped steps of this launch
        inner = optimizer.step

        def guarded_step(opt, *args, **kwargs):
            if self.decided is None:  # ZeRO-3 may call step once per parameter sub-group: decide once
                self.decided = self._bad()
            if self.decided:
                return None
            return inner(*args, **kwargs)

        optimizer.step = types.MethodType(guarded_step, optimizer)  # a bound method, as LambdaLR expects

    def see_loss(self, loss: torch.Tensor) -> None:
        """Record a micro-batch loss of the current step (non-finite -> the step is skipped)."""
        if not math.isfinite(float(loss.detach())):
            self.loss_bad = True

    def _bad(self) -> bool:
        # One device-side flag per gradient, one host read in all (no sync per parameter on a GPU).
        finite = [torch.isfinite(p.grad).all() for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        flag = torch.tensor([1.0 if self.loss_bad else 0.0], device=self.device)
        if finite:
            flag = torch.maximum(flag, (~torch.stack(finite).all()).float().to(self.device).reshape(1))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def end_step(self, scheduler) -> bool:
        """Close the current optimizer step; returns True when its update was skipped (and then puts the
        ``LambdaLR`` ``scheduler`` back by the step DeepSpeed took after it)."""
        skipped = bool(self.decided)
        self.loss_bad, self.decided = False, None
        if not skipped:
            self.in_row = 0
            return False
        self.in_row += 1
        self.total += 1
        s = scheduler
        s.last_epoch -= 1
        lrs = [base * lam(s.last_epoch) for base, lam in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs
        return True
