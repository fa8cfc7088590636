"""Context extension: ``model.rope_theta`` and ``model.rope_scaling`` change the rotary embedding at load and
are written into the saved config."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM

from train.__main__ import to_run_config
from train.model import build_model

from .conftest import REPO
from .test_model_errors import model_cfg

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def logits(lm, ids, pos):
    with torch.no_grad():  # an explicit mask: positions that skip numbers are not read as packed documents
        return lm(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in SCALINGS])
def test_rope_scaling_is_applied_at_load_and_saved(kind, init_checkpoint, tmp_path):
    scaling = SCALINGS[kind]
    lm = build_model(model_cfg(init_checkpoint, rope_scaling=dict(scaling)), vocab_size=10).eval()
    # Transformers' own model with this scaling in its config gives the same logits.
    ref_cfg = AutoConfig.from_pretrained(init_checkpoint)
    ref_cfg.rope_parameters = {**scaling, "rope_theta": 500000.0}
    ref = AutoModelForCausalLM.from_pretrained(init_checkpoint, config=ref_cfg).eval()
    plain = AutoModelForCausalLM.from_pretrained(init_checkpoint).eval()
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)[None]
    torch.testing.assert_close(logits(lm, ids, pos), logits(ref, ids, pos), rtol=0, atol=0)
    if kind != "dynamic":  # dynamic NTK changes nothing below max_position_embeddings (4096)
        assert not torch.allclose(logits(lm, ids, pos), logits(plain, ids, pos))
    lm.save_pretrained(tmp_path / "out")
    saved = AutoConfig.from_pretrained(tmp_path / "out").rope_parameters
    assert saved == {**scaling, "rope_theta": 500000.0}


def test_linear_scaling_by_hand(init_checkpoint):
    """Linear scaling by f divides every rotary frequency by f (head_dim 16, base 500000): the scaled model at
    positions 2p equals the plain model at positions p."""
    lm = build_model(model_cfg(init_checkpoint, rope_scaling={"rope_type": "linear", "factor": 2.0}), 10).eval()
    plain = AutoModelForCausalLM.from_pretrained(init_checkpoint).eval()
    inv = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, inv / 2)
    ids = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(1))
    p = torch.arange(30)[None]
    torch.testing.assert_close(logits(lm, ids, 2 * p), logits(plain, ids, p), rtol=1e-5, atol=1e-5)


def test_rope_theta_and_scaling_together_and_on_a_fresh_model():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        yarn = "model.rope_scaling={rope_type:yarn,factor:4.0,original_max_position_embeddings:32}"
        o = ["model.rope_theta=1e6", yarn,
             "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=1"]
        cfg = to_run_config(compose("config", overrides=o), o)
    lm = build_model(cfg.model, vocab_size=10)
    assert lm.config.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "rope_theta": 1e6}


@pytest.mark.parametrize("value,message", [
    pytest.param("{rope_type:ntk,factor:2.0}", "rope_type must be one of default, linear", id="type"),
    pytest.param("{rope_type:linear}", "rope_type linear needs a factor > 0", id="factor"),
    pytest.param("2.0", "must be a dict", id="not-a-dict"),
])
def test_bad_rope_scaling_names_the_setting(value, message):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        with pytest.raises(ValueError, match=rf"model.rope_scaling=.*{message}"):
            to_run_config(compose("config", overrides=[f"model.rope_scaling={value}"]))
