"""Every shipped config composes into the typed schema; the SLURM launcher config composes."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.__main__ import to_run_config
from train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUP_CHOICES = [
    f"{group.name}={f.stem}"
    for group in sorted(CONFIGS.iterdir())
    if group.is_dir() and group.name != "hydra"
    for f in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("choice", GROUP_CHOICES)
def test_every_group_option_composes(choice):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=[choice]))
    assert isinstance(cfg, RunConfig)


def test_paper_recipe_values():
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=["model=llama3_8b", "moba=paper_1m"]))
    assert (cfg.moba.block_size, cfg.moba.top_k, cfg.moba.full_layer_indices()) == (4096, 12, [-3, -2, -1])
    assert cfg.model.num_kv_heads == 8 and cfg.model.rope_theta == 500000.0


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["tasks_per_node"] == 8


@pytest.mark.parametrize(
    "override,message",
    [
        pytest.param("train.eval_batches=0", "train.eval_batches=0 must be >= 1", id="eval-batches-0"),
        pytest.param("train.eval_batches=-2", "train.eval_batches=-2 must be >= 1", id="eval-batches-neg"),
        pytest.param("train.eval_every=-1", "train.eval_every=-1 must be >= 0", id="eval-every-neg"),
        pytest.param("model.max_position_embeddings=0", "model.max_position_embeddings=0 must be >= 1", id="max-pos"),
        pytest.param("seed=-1", "seed=-1 must lie in", id="seed-neg"),
        pytest.param("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0", id="grad-clip"),
        pytest.param("optim.implementation=apex", "optim.implementation='apex' must be one of auto, fused, foreach, "
                     "for-loop", id="adamw-implementation"),
        pytest.param("+moba.blocksize=64", "moba.blocksize is not a setting (did you mean moba.block_size?)",
                     id="plus-typo"),
        pytest.param("+train.eval_batch=2", "train.eval_batch is not a setting (did you mean train.eval_batches?)",
                     id="plus-typo-train"),
        pytest.param("+logging.wandb.entity=me", "logging.wandb.entity is not a setting", id="plus-nested"),
        pytest.param("+lr=0.1", "lr is not a setting", id="plus-top-level"),
    ],
)
def test_bad_value_or_added_key_is_refused(override, message):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=[override])
        with pytest.raises(ValueError, match=re.escape(message)):
            to_run_config(cfg)


@pytest.mark.parametrize("env,message", [
    pytest.param({"MOBA_CUDNN_MIN_SEQLEN": "4k"}, "MOBA_CUDNN_MIN_SEQLEN='4k' must be a positive number of tokens",
                 id="min-seqlen-4k"),
    pytest.param({"MOBA_CUDNN_MIN_SEQLEN": "0"}, "MOBA_CUDNN_MIN_SEQLEN='0' must be a positive number of tokens",
                 id="min-seqlen-0"),
    pytest.param({"MOBA_CUDNN_ATTENTION": "maybe"}, "MOBA_CUDNN_ATTENTION='maybe' must be 1/true/on/yes or "
                 "0/false/off/no", id="attention-maybe"),
])
def test_bad_cudnn_environment_is_refused_by_the_config_check(monkeypatch, env, message):
    """The check every rank runs before any data, model or GPU work raises moba_core.varlen.cudnn_env's error;
    it used to come from the first attention call, after the model was built and the data loaded."""
    from moba_core.varlen import cudnn_env

    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config"))
    cfg.check()  # the environment as the test session has it
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as from_env:
        cudnn_env()
    assert str(from_env.value) == message  # the same message as moba_core's own
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.check()
    monkeypatch.setenv("MOBA_CUDNN_ATTENTION", "off")
    monkeypatch.setenv("MOBA_CUDNN_MIN_SEQLEN", "8192")
    cfg.check()  # good values pass


@pytest.mark.parametrize("full", [[0, 0], [1, -3], [-1, 3]], ids=["repeat", "pos-neg", "neg-pos"])
def test_a_layer_named_twice_in_full_attn_layers_is_refused_at_launch(full):
    """Two indices of one layer (``[1, -3]`` of 4 layers) are most likely a typo for another layer: a training launch
    refuses them, as ``moba.layers`` refuses a layer set twice (``moba_core``'s ``moba_layers`` still takes them:
    runs saved before this check are evaluated and exported as they trained)."""
    from moba_core import MoBAConfig

    a, b = full
    layer = a % 4
    cfg = _composed(f"moba.full_attn_layers=[{a},{b}]")
    with pytest.raises(ValueError, match=rf"names layer {layer} twice \(as {a} and {b}\) in a model of 4 layers"):
        cfg.check(shape=(4, 2, 4))
    assert MoBAConfig(block_size=16, top_k=2, full_attn_layers=full).moba_layers(4) == sorted(set(range(4)) - {layer})
    _composed(f"moba.full_attn_layers=[{a},{(b + 1) % 4}]").check(shape=(4, 2, 4))


@pytest.mark.parametrize("full", [[5, 1], [1, 5], [-5, 3]])
def test_an_index_outside_the_model_in_full_attn_layers_is_named_as_such(full):
    """``[5, 1]`` of 4 layers: 5 is outside the model (not "layer 1 twice", which 5 % 4 would suggest)."""
    bad = next(i for i in full if not -4 <= i < 4)
    with pytest.raises(ValueError, match=rf"moba.full_attn_layers contains {bad}, outside a model of 4 layers"):
        _composed(f"moba.full_attn_layers=[{full[0]},{full[1]}]").check(shape=(4, 2, 4))


@pytest.mark.parametrize(
    "overrides,expect",
    [
        pytest.param([], None, id="checkpoint-value"),
        pytest.param(["model=llama3_8b"], None, id="preset-does-not-win"),
        pytest.param(["model.rope_theta=20000"], 20000.0, id="command-line-wins"),
    ],
)
def test_checkpoint_fields_win_over_model_group_defaults(init_checkpoint, overrides, expect):
    """The tiny model group's ``rope_theta: 10000.0`` (or llama3_8b's shape) must not replace what the
    checkpoint carries; a value given on the command line does."""
    from train.model import build_model

    overrides = [f"model.name_or_path={init_checkpoint}", *overrides]
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides), overrides)
    assert cfg.model.rope_theta == expect and cfg.model.hidden_size is None
    lm = build_model(cfg.model, vocab_size=100)
    assert lm.config.rope_parameters["rope_theta"] == (expect or 500000.0)
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (64, 2)  # the checkpoint's shape
    # RoPE really uses that base: the rotary inverse frequencies are base ** (-2i / head_dim).
    inv_freq = lm.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq[1], torch.tensor((expect or 500000.0) ** (-2 / 16)), rtol=1e-5)


def test_explicit_shape_that_differs_from_the_checkpoint_is_refused(init_checkpoint):
    from train.model import model_shape

    overrides = [f"model.name_or_path={init_checkpoint}", "model.hidden_size=128"]
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides), overrides)
    with pytest.raises(ValueError, match=re.escape("model.hidden_size=128 differs from the checkpoint's 64")):
        model_shape(cfg.model)


def test_fresh_model_keeps_the_group_values():
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=["model=llama3_8b"]), ["model=llama3_8b"])
    assert cfg.model.rope_theta == 500000.0 and cfg.model.hidden_size == 4096


def _composed(*overrides) -> RunConfig:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return to_run_config(compose("config", overrides=list(overrides)))


def test_warnings_name_an_empty_schedule_phase_and_a_warmup_that_never_ends():
    """Valid settings a user most likely did not mean: the switch of a two-phase schedule rounds to step 0 or to
    the last step (one phase never runs), and a warm-up at least as long as the run."""
    quiet = _composed("train.max_steps=100", "optim.warmup_steps=10")
    assert quiet.warnings() == []
    (msg,) = _composed("schedule=full_then_moba", "schedule.switch_fraction=0.1", "train.max_steps=4",
                       "optim.warmup_steps=1").warnings()
    assert "schedule=full_then_moba" in msg and "switches at step 0" in msg and "the full phase has no steps" in msg
    (msg,) = _composed("schedule=moba_then_full", "schedule.switch_fraction=0.9", "train.max_steps=4",
                       "optim.warmup_steps=1").warnings()
    assert "switches at step 4" in msg and "the full phase has no steps" in msg
    assert _composed("schedule=full_then_moba", "schedule.switch_fraction=0.5", "train.max_steps=4",
                     "optim.warmup_steps=1").warnings() == []
    (msg,) = _composed("train.max_steps=10", "optim.warmup_steps=20").warnings()
    assert "optim.warmup_steps=20 >= train.max_steps=10" in msg and "0.50 x optim.lr" in msg  # lr_lambda(9) = 10/20


@pytest.mark.parametrize(
    "overrides,expect",
    [
        pytest.param(["schedule=moba", "schedule.start_fraction=0.5"],
                     ["schedule.start_fraction=0.5 has no effect with schedule=moba (read only by schedule=gradual)"],
                     id="moba-start"),
        pytest.param(["schedule=gradual", "schedule.switch_fraction=0.3", "schedule.end_fraction=0.8"],
                     ["schedule.switch_fraction=0.3 has no effect with schedule=gradual (read only by "
                      "schedule=full_then_moba / moba_then_full)"], id="gradual-switch"),
        pytest.param(["schedule=full_then_moba", "schedule.switch_fraction=0.3", "schedule.reverse=true"],
                     ["schedule.reverse=true has no effect with schedule=full_then_moba (read only by "
                      "schedule=gradual)"], id="two-phase-reverse"),
        pytest.param(["schedule=gradual", "schedule.start_fraction=0.2", "schedule.order=last_to_first"], [],
                     id="all-read"),
    ],
)
def test_schedule_settings_the_schedule_does_not_read_are_named(overrides, expect):
    """A ``schedule.*`` field given on the command line that the chosen schedule ignores: a warning naming it and
    the schedules that read it (the group files' own values are not the user's and are not reported)."""
    assert _composed(*overrides).schedule.unused_overrides(overrides) == expect


def test_unused_vocab_size_is_named():
    """data.vocab_size sizes only a tokenizer trained on the corpus: set while the tokenizer comes from elsewhere
    with another vocabulary, it is reported; at its default or equal to the tokenizer's vocabulary, not."""
    data = _composed("data.vocab_size=1024").data
    msg = data.unused_vocab_size(8192, "data.path=prepared/x (prepared)")
    assert msg.startswith("data.vocab_size=1024 is not used") and "8192 tokens" in msg
    assert data.unused_vocab_size(8192, None) is None  # trained here: it is used
    assert data.unused_vocab_size(1024, "data.tokenizer=t.model") is None
    assert _composed().data.unused_vocab_size(32000, "data.tokenizer=hf") is None  # the default: not the user's


def test_override_keys_are_checked_before_hydra_composes():
    """A mistyped ``a.b=value`` gets the closest setting named (Hydra's own error only suggests ``+a.b=value``);
    flags, group choices, hydra.* keys, additions / deletions and values inside non-dataclass fields pass."""
    from train.config import check_override_keys

    valid = ["-m", "--cfg", "job", "train.max_steps=5", "logging.wandb.mode=disabled", "hydra.run.dir=runs/x",
             "+foo.bar=1", "~moba.layers", "moba.layers=[{layer:0,block_size:64}]", "model=tiny", "schedule=gradual",
             "schedule.switch_fraction=0.5", "model.name_or_path=x", "moba.block_size=64,128", "seed=3",
             "model@other=tiny", *GROUP_CHOICES]
    check_override_keys(valid)
    bad_keys = [("train.max_step=5", "train.max_step is not a setting (did you mean train.max_steps?)"),
                ("logging.wandb.mod=x", "logging.wandb.mod is not a setting (did you mean logging.wandb.mode?)"),
                ("lr.value=1", "lr is not a setting; the config has: model, moba, "),
                # the entries of a list of dataclasses: Hydra's own error suggests +moba.layers=...
                ("moba.layers=[{layer: 0, top_k: 2}, {layer:1,blocksize:64}]",
                 "moba.layers[1].blocksize is not a setting (did you mean moba.layers[1].block_size?); "
                 "moba.layers[1] has: layer, block_size, top_k")]
    for bad, message in bad_keys:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_override_keys([*valid[:3], bad])


def test_eval_override_keys_are_checked_against_the_eval_schema():
    """``python -m train.eval`` checks its keys against ``EvalConfig`` as ``python -m train`` does against
    ``RunConfig``."""
    from train.config import check_override_keys
    from train.eval import EvalConfig

    check_override_keys(["eval.lengths=[256]", "moba.top_k=2", "device=cpu", "eval.targets=['runs/x']"], EvalConfig)
    with pytest.raises(ValueError, match=re.escape("eval.lenghts is not a setting (did you mean eval.lengths?)")):
        check_override_keys(["eval.lenghts=[256]"], EvalConfig)
