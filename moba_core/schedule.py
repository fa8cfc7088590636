"""Step-wise hybrid schedules: which layers run MoBA at a given training step.

Schedules (MoBA paper, arXiv 2502.13189, Sec. 3.2):
    "moba"            MoBA in every MoBA layer at every step (``full_attn_layers`` stay full).
    "full"            full attention everywhere (a baseline, or a base-checkpoint stage).
    "full_then_moba"  full attention for the first ``switch_fraction`` of the steps, then MoBA
                      (activating MoBA on a model trained with full attention).
    "moba_then_full"  MoBA for the first ``switch_fraction`` of the steps, then full attention (the
                      paper's hybrid: MoBA for 90% of the tokens, full attention for the last 10%).
"""

from __future__ import annotations

SCHEDULES = ("moba", "full", "full_then_moba", "moba_then_full")


def check_schedule(name: str, switch_fraction: float) -> None:
    """Raises ValueError naming ``schedule.name`` / ``schedule.switch_fraction`` when invalid."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} must be one of {SCHEDULES}")
    if not 0.0 <= switch_fraction <= 1.0:
        raise ValueError(f"schedule.switch_fraction={switch_fraction} must lie in [0, 1]")


def moba_active(name: str, step: int, max_steps: int, switch_fraction: float) -> bool:
    """Whether MoBA layers run MoBA at optimizer step ``step`` (0-based) of ``max_steps``."""
    switch = int(round(switch_fraction * max_steps))
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
