"""Step-wise hybrid schedules: which layers run MoBA at a given training step.

Schedules (MoBA paper, arXiv 2502.13189, Sec. 3.2):
    "moba"            MoBA in every MoBA layer at every step (``full_attn_layers`` stay full).
    "full"            full attention everywhere (a baseline, or a base-checkpoint stage).
    "full_then_moba"  full attention for the first ``switch_fraction`` of the steps, then MoBA
                      (activating MoBA on a model trained with full attention).
    "moba_then_full"  MoBA for the first ``switch_fraction`` of the steps, then full attention (the
                      paper's hybrid: MoBA for 90% of the tokens, full attention for the last 10%).
    "gradual"         the MoBA layers move from full attention to MoBA one at a time, in ``order``, at
                      evenly spaced steps of the window [``start_fraction``, ``end_fraction``) of the
                      steps; ``reverse`` moves them from MoBA to full attention instead.

Steps are 0-based optimizer steps of a stage of ``max_steps`` steps; a fraction f is step
``round(f * max_steps)``. In the gradual window [s0, s1) of W = s1 - s0 steps, the j-th of the N layers
of ``order`` (j = 0 .. N-1) switches at step ``s0 + ceil(j * W / N)``: the first at s0, the others at the
start of each of N equal slots of the window, so every layer has switched at s1 (all at s0 when W = 0).
The schedule is a function of the step alone, so a run resumed mid-transition continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEDULES = ("moba", "full", "full_then_moba", "moba_then_full", "gradual")
ORDERS = ("first_to_last", "last_to_first")  # or a list of layer indices


def check_schedule(name: str, switch_fraction: float) -> None:
    """Raises ValueError naming ``schedule.name`` / ``schedule.switch_fraction`` when invalid."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} must be one of {SCHEDULES}")
    if not 0.0 <= switch_fraction <= 1.0:
        raise ValueError(f"schedule.switch_fraction={switch_fraction} must lie in [0, 1]")


def fraction_step(fraction: float, max_steps: int) -> int:
    """The 0-based step at which a fraction of a stage of ``max_steps`` steps is reached."""
    return int(round(fraction * max_steps))


def moba_active(name: str, step: int, max_steps: int, switch_fraction: float) -> bool:
    """Whether MoBA layers run MoBA at optimizer step ``step`` (0-based) of ``max_steps`` (the schedules
    that switch every layer at once; not ``gradual``)."""
    switch = fraction_step(switch_fraction, max_steps)
    if name == "moba":
        return True
    if name == "full":
        return False
    if name == "full_then_moba":
        return step >= switch
    return step < switch


def uses_moba(name: str) -> bool:
    """Whether the schedule runs MoBA at any step (so the model needs the MoBA attention function)."""
    return name != "full"


@dataclass(frozen=True)
class Schedule:
    """A hybrid schedule, checked on construction (see the module docstring for the step arithmetic).

    Attributes:
        name: one of ``SCHEDULES``.
        switch_fraction: fraction of the steps at which ``full_then_moba`` / ``moba_then_full`` switch.
        start_fraction / end_fraction: the window of ``gradual`` (fractions of the steps, start <= end).
        order: ``gradual``'s order of layers: "first_to_last", "last_to_first", or a list of layer
            indices (negative = from the last layer) naming every MoBA layer once.
        reverse: ``gradual`` moves layers from MoBA to full attention instead of full to MoBA.

    Raises:
        ValueError: naming the setting (``schedule.<field>``) and the bad value.
    """

    name: str = "moba"
    switch_fraction: float = 0.9
    start_fraction: float = 0.0
    end_fraction: float = 1.0
    order: Any = "first_to_last"
    reverse: bool = False

    def __post_init__(self):
        check_schedule(self.name, self.switch_fraction)
        for key in ("start_fraction", "end_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"schedule.{key}={getattr(self, key)} must lie in [0, 1]")
        if self.start_fraction > self.end_fraction:
            raise ValueError(f"schedule.start_fraction={self.start_fraction} must be <= "
                             f"schedule.end_fraction={self.end_fraction}")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                raise ValueError(f"schedule.order={self.order!r} must be one of {ORDERS} or a list of layer indices")
        elif not (isinstance(self.order, (list, tuple)) and all(isinstance(i, int) for i in self.order)):
            raise ValueError(f"schedule.order={self.order!r} must be one of {ORDERS} or a list of layer indices")

    def layer_order(self, moba_layers: list[int], num_layers: int) -> list[int]:
        """The MoBA layers in the order ``gradual`` switches them.

        Raises:
            ValueError: a listed ``order`` that is not exactly the MoBA layers, each once.
        """
        if self.order == "first_to_last":
            return sorted(moba_layers)
        if self.order == "last_to_first":
            return sorted(moba_layers, reverse=True)
        out = []
        for i in self.order:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"schedule.order contains {i}, outside a model of {num_layers} layers")
            out.append(i % num_layers)
        if sorted(out) != sorted(moba_layers):
            raise ValueError(f"schedule.order={list(self.order)} must name every MoBA layer once: "
                             f"{sorted(moba_layers)} (moba.full_attn_layers stay full)")
        return out

    def switch_steps(self, max_steps: int, moba_layers: list[int], num_layers: int) -> dict[int, int]:
        """``gradual``: the 0-based step at which each MoBA layer switches, ``{layer: step}``."""
        order = self.layer_order(moba_layers, num_layers)
        s0, s1 = fraction_step(self.start_fraction, max_steps), fraction_step(self.end_fraction, max_steps)
        n = max(len(order), 1)
        return {layer: s0 + -(-j * (s1 - s0) // n) for j, layer in enumerate(order)}

    def moba_layers_at(self, step: int, max_steps: int, moba_layers: list[int], num_layers: int) -> list[int]:
        """The layers that run MoBA at 0-based optimizer ``step`` of ``max_steps`` (sorted), out of the
        model's MoBA layers ``moba_layers`` (``MoBAConfig.moba_layers``) in a model of ``num_layers``."""
        if self.name != "gradual":
            active = moba_active(self.name, step, max_steps, self.switch_fraction)
            return sorted(moba_layers) if active else []
        switch = self.switch_steps(max_steps, moba_layers, num_layers)
        return sorted(layer for layer, s in switch.items() if (step >= s) != self.reverse)
