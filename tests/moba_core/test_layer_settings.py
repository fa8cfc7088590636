"""Per-layer MoBA settings (``MoBAConfig.layers``): each layer's block size and top-k reach every call."""

import pytest
import torch

import moba_core.hf as hf
from moba_core import MoBAConfig
from moba_core.hf import apply_moba

from .test_hf import tiny_llama


def test_for_layer_applies_the_layer_entry():
    cfg = MoBAConfig(block_size=32, top_k=3, layers={0: {"block_size": 16}, -1: {"top_k": 1}})
    got = [(c.block_size, c.top_k, c.layers) for c in (cfg.for_layer(i, 3) for i in range(3))]
    assert got == [(16, 3, {}), (32, 3, {}), (32, 1, {})]


def test_layer_settings_reach_every_attention_call(monkeypatch):
    """A spy in place of moba_attention records each call's layer, block size and top-k."""
    calls = []
    real = hf.moba_attention

    def spy(q, k, v, cu, max_len, block_size, top_k, **kw):
        calls.append((block_size, top_k))
        return real(q, k, v, cu, max_len, block_size, top_k, **kw)

    monkeypatch.setattr(hf, "moba_attention", spy)
    ids = torch.randint(0, 97, (1, 96))
    m = tiny_llama(layers=4)
    apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[2],
                             layers={0: {"block_size": 32, "top_k": 3}, -1: {"top_k": 1}}))
    with torch.no_grad():
        logits = m(ids).logits
    assert calls == [(32, 3), (16, 2), (16, 1)]  # layers 0, 1, 3 in order; layer 2 is full

    # The settings change the result: the same model with the shared settings in every layer differs.
    plain = tiny_llama(layers=4)
    apply_moba(plain, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[2]))
    with torch.no_grad():
        assert (plain(ids).logits - logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param(dict(layers={0: {"block_size": 24}}), "moba.layers: layer 0: moba.block_size=24", id="block"),
        pytest.param(dict(layers={1: {"top_k": 0}}), "moba.layers: layer 1: moba.top_k=0", id="topk"),
        pytest.param(dict(layers={1: {"backend": "flash"}}), "moba.layers: layer 1 sets", id="other-key"),
        pytest.param(dict(layers={1: {}}), "moba.layers: layer 1 sets", id="empty"),
    ],
)
def test_layer_settings_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoBAConfig(block_size=16, top_k=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param(dict(layers={5: {"top_k": 1}}), "moba.layers sets layer 5, outside a model of 3 layers",
                     id="outside"),
        pytest.param(dict(layers={2: {"top_k": 1}}, full_attn_layers=[-1]),
                     "moba.layers sets layer 2, which moba.full_attn_layers keeps full", id="full-layer"),
        pytest.param(dict(layers={2: {"top_k": 1}, -1: {"top_k": 2}}), "moba.layers sets layer 2 twice",
                     id="twice"),
    ],
)
def test_layer_settings_checked_against_the_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_moba(tiny_llama(), MoBAConfig(block_size=16, top_k=2, **kwargs))
