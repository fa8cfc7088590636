"""Hybrid schedules, per-layer settings and the paper's recipes from the command line; a gradual schedule
resumed in the middle of its transition continues it exactly."""

import json

import pytest
from hydra import compose, initialize_config_dir

from train.__main__ import to_run_config

from .conftest import read_metrics, run_train
from .test_configs import CONFIGS


def composed(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return to_run_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "name,values",
    [
        pytest.param("paper_moba_then_full", ("moba_then_full", 0.9, 2048, 3, [], 32768), id="moba-then-full"),
        pytest.param("paper_last3_full", ("moba", 0.9, 2048, 3, [-3, -2, -1], 32768), id="last3-full"),
        pytest.param("paper_1m", ("moba", 0.9, 4096, 12, [-3, -2, -1], 1048576), id="1m"),
    ],
)
def test_paper_recipes(name, values):
    cfg = composed(f"experiment={name}")
    got = (cfg.schedule.name, cfg.schedule.switch_fraction, cfg.moba.block_size, cfg.moba.top_k,
           cfg.moba.full_layer_indices(), cfg.data.seq_len)
    assert cfg.experiment == name and got == values
    if name == "paper_1m":
        assert cfg.model.name == "llama3_8b" and cfg.model.num_layers == 32


def test_layer_settings_from_the_command_line():
    cfg = composed("moba.block_size=32", "moba.top_k=3", "moba.layers=[{layer:0,block_size:64},{layer:[1,-1],top_k:2}]")
    moba = cfg.moba.to_moba_config()
    assert moba.layers == {0: {"block_size": 64}, 1: {"top_k": 2}, -1: {"top_k": 2}}
    assert [(c.block_size, c.top_k) for c in (moba.for_layer(i, 4) for i in range(4))] == \
        [(64, 3), (32, 2), (32, 3), (32, 2)]


@pytest.mark.parametrize(
    "override,message",
    [
        pytest.param("moba.layers=[{layer:0}]", "moba.layers entry (layer=0, block_size=None, top_k=None) needs",
                     id="no-setting"),
        pytest.param("moba.layers=[{block_size:64}]", "needs a layer index", id="no-layer"),
        pytest.param("moba.layers=[{layer:0,block_size:40}]", "moba.layers: layer 0: moba.block_size=40",
                     id="bad-block"),
        pytest.param("moba.layers=[{layer:1,top_k:2},{layer:1,block_size:64}]", "moba.layers sets layer 1 twice",
                     id="twice"),
    ],
)
def test_bad_layer_settings_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        composed(override)


@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param(["schedule=gradual", "schedule.order=[0]"], "schedule.order=[0] must name every MoBA layer once",
                     id="order"),
        pytest.param(["moba.layers=[{layer:5,top_k:2}]"], "moba.layers sets layer 5, outside a model of 4 layers",
                     id="layer-outside"),
        pytest.param(["data.seq_len=128", "moba.block_size=32", "moba.layers=[{layer:0,block_size:256}]"],
                     "data.seq_len=128 is smaller than moba.layers' block_size=256 of layer 0", id="seq-lt-block"),
    ],
)
def test_checks_against_the_model(overrides, message):
    from train.model import model_shape

    cfg = composed(*overrides)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.check(shape=model_shape(cfg.model))


def test_gradual_schedule_resumed_mid_transition_continues_exactly(tmp_path, data_cache):
    """2 layers over the window [round(0.25 * 8), round(0.75 * 8)) = [2, 6): layer 1 (last_to_first) switches at
    0-based step 2, layer 0 at 2 + 4/2 = 4; metrics.jsonl row k is 0-based step k - 1. A run of 8 steps, and a
    second run resumed from its step-3 checkpoint (in the middle of the transition): the same layers and losses
    at every step after 3."""
    args = ["schedule=gradual", "schedule.start_fraction=0.25", "schedule.end_fraction=0.75",
            "schedule.order=last_to_first", "train.max_steps=8", "checkpoint.every=3", "checkpoint.keep=0",
            "moba.layers=[{layer:0,top_k:2}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(args, straight, data_cache)
    proc = run_train([*args, f"resume={straight / 'checkpoints' / 'step_00000003'}"], resumed, data_cache)
    out = proc.stdout + proc.stderr
    assert "at step 3" in out and "schedule gradual: layer 0 full -> MoBA from step 5 on" in out
    expect = [[], [], [1], [1], [0, 1], [0, 1], [0, 1], [0, 1]]
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["moba_layer_ids"] for m in a] == expect and [m["moba_layers"] for m in a] == [len(x) for x in expect]
    assert [m["step"] for m in b] == [4, 5, 6, 7, 8] and [m["moba_layer_ids"] for m in b] == expect[3:]
    for ma, mb in zip(a[3:], b):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    assert json.loads((resumed / "config.json").read_text())["moba"]["layers"] == \
        [{"layer": 0, "block_size": None, "top_k": 2}]
