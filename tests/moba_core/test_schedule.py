"""Hybrid schedules: the gradual schedule's switch steps (hand-worked), its order and reverse, and errors."""

import pytest

from moba_core.schedule import Schedule, moba_active


def per_step(schedule, max_steps, moba_layers, num_layers):
    return [schedule.moba_layers_at(s, max_steps, moba_layers, num_layers) for s in range(max_steps)]


@pytest.mark.parametrize(
    "kwargs,max_steps,moba_layers,num_layers,expect",
    [
        # window steps [2, 8) of 10, 4 layers in slots of 1.5 steps: switches at 2, 2+ceil(1.5)=4, 2+3=5,
        # 2+ceil(4.5)=7
        pytest.param(dict(start_fraction=0.2, end_fraction=0.8), 10, [0, 1, 2, 3], 4,
                     [[], [], [0], [0], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]],
                     id="even-window"),
        # fractions that do not divide the steps: round(0.3 * 7) = 2, round(0.9 * 7) = 6; 3 layers over 4
        # steps switch at 2, 2 + ceil(4/3) = 4, 2 + ceil(8/3) = 5
        pytest.param(dict(start_fraction=0.3, end_fraction=0.9), 7, [0, 1, 2], 3,
                     [[], [], [0], [0], [0, 1], [0, 1, 2], [0, 1, 2]], id="uneven-fractions"),
        # the whole run: the first layer already in the first step, the last one in the last step
        pytest.param(dict(start_fraction=0.0, end_fraction=1.0), 4, [0, 1, 2, 3], 4,
                     [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]], id="first-and-last-step"),
        # more layers than window steps: several switch in one step (4 layers over steps 4, 5)
        pytest.param(dict(start_fraction=0.4, end_fraction=0.6), 8, [0, 1, 2, 3], 4,
                     [[], [], [], [0], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], id="crowded"),
        # an empty window: every layer at once
        pytest.param(dict(start_fraction=0.5, end_fraction=0.5), 4, [0, 1], 2, [[], [], [0, 1], [0, 1]],
                     id="empty-window"),
        pytest.param(dict(start_fraction=0.0, end_fraction=1.0, order="last_to_first"), 4, [0, 1, 2], 4,
                     [[2], [2], [1, 2], [0, 1, 2]], id="last-to-first-with-a-full-layer"),
        pytest.param(dict(start_fraction=0.0, end_fraction=1.0, order=[2, 0, -1]), 3, [0, 2, 3], 4,
                     [[2], [0, 2], [0, 2, 3]], id="listed-order"),
        pytest.param(dict(start_fraction=0.25, end_fraction=0.75, reverse=True), 8, [0, 1], 2,
                     [[0, 1], [0, 1], [1], [1], [], [], [], []], id="reverse"),
    ],
)
def test_gradual_switch_steps(kwargs, max_steps, moba_layers, num_layers, expect):
    assert per_step(Schedule("gradual", **kwargs), max_steps, moba_layers, num_layers) == expect


@pytest.mark.parametrize("name", ["moba", "full", "full_then_moba", "moba_then_full"])
def test_one_switch_schedules_move_every_layer_together(name):
    s = Schedule(name, switch_fraction=0.3)
    assert per_step(s, 10, [0, 2], 3) == [[0, 2] if moba_active(name, t, 10, 0.3) else [] for t in range(10)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param(dict(name="gradually"), "schedule.name='gradually'", id="name"),
        pytest.param(dict(start_fraction=-0.1), r"schedule.start_fraction=-0.1 must lie in \[0, 1\]", id="start"),
        pytest.param(dict(end_fraction=1.5), r"schedule.end_fraction=1.5 must lie in \[0, 1\]", id="end"),
        pytest.param(dict(start_fraction=0.6, end_fraction=0.4), "schedule.start_fraction=0.6 must be <=", id="order"),
        pytest.param(dict(order="random"), "schedule.order='random' must be one of", id="order-name"),
    ],
)
def test_schedule_errors_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**{"name": "gradual", **kwargs})


@pytest.mark.parametrize(
    "order,message",
    [
        pytest.param([0, 1], r"schedule.order=\[0, 1\] must name every MoBA layer once: \[0, 1, 2\]", id="missing"),
        pytest.param([0, 1, 2, 3], r"must name every MoBA layer once", id="full-layer-listed"),
        pytest.param([0, 1, 7], "schedule.order contains 7, outside a model of 4 layers", id="outside"),
    ],
)
def test_listed_order_must_be_the_moba_layers(order, message):
    with pytest.raises(ValueError, match=message):
        Schedule("gradual", order=order).moba_layers_at(0, 10, [0, 1, 2], 4)
