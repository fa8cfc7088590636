"""``train.warmup_attention_plans``: which lengths a run warms (``dense_attention_max_len``) and at which shape
(``warm_attention_plans``), with ``tests.moba_core.test_varlen._Keys`` standing in for cuDNN on the CPU."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import moba_core.varlen as varlen
from moba_core.config import MoBAConfig
from moba_core.schedule import Schedule
from tests.moba_core.test_varlen import _Keys
from train.model import dense_attention_max_len, warm_attention_plans


def test_dense_attention_max_len(monkeypatch):
    monkeypatch.delenv("MOBA_DENSE_PATH", raising=False)
    cfgs = {i: MoBAConfig(block_size=512, top_k=8) for i in range(4)}
    # every layer MoBA at every step: a document's first top_k blocks (8 x 512) are the longest dense part
    assert dense_attention_max_len(131072, cfgs, 4, "moba") == 4096
    assert dense_attention_max_len(2048, cfgs, 4, "moba") == 2048  # documents are never longer than seq_len
    cfgs[2] = MoBAConfig(block_size=4096, top_k=12)  # a per-layer override
    assert dense_attention_max_len(131072, cfgs, 4, "moba") == 49152
    # a full-attention layer, or a schedule with full-attention phases: whole documents
    assert dense_attention_max_len(131072, {0: cfgs[0]}, 4, "moba") == 131072
    for name in ("full", "full_then_moba", "gradual"):
        assert dense_attention_max_len(131072, cfgs, 4, name) == 131072
    monkeypatch.setenv("MOBA_DENSE_PATH", "0")  # MoBA layers then use no dense primitive at all
    assert dense_attention_max_len(131072, cfgs, 4, "moba") == 0


@pytest.mark.parametrize("schedule, first, expected", [
    (Schedule("full_then_moba", switch_fraction=0.5), 0, 131072),
    (Schedule("full_then_moba", switch_fraction=0.5), 49, 131072),  # step 50 (0-based 49) is the last full one
    (Schedule("full_then_moba", switch_fraction=0.5), 50, 4096),  # resumed past the switch: MoBA to the end
    (Schedule("full_then_moba", switch_fraction=0.0), 0, 4096),
    (Schedule("moba_then_full", switch_fraction=0.9), 0, 131072),
    (Schedule("moba_then_full", switch_fraction=1.0), 0, 4096),  # never full
    # layers switch at steps 20, 30, 40, 50 (0-based)
    (Schedule("gradual", start_fraction=0.2, end_fraction=0.6), 49, 131072),
    (Schedule("gradual", start_fraction=0.2, end_fraction=0.6), 50, 4096),  # every layer switched to MoBA
    (Schedule("gradual", start_fraction=0.2, end_fraction=0.6, reverse=True), 0, 131072),
    (Schedule("gradual", start_fraction=0.2, end_fraction=0.6, reverse=True), 80, 131072),
    (Schedule("full"), 0, 131072),
    (Schedule("moba"), 0, 4096),
    (Schedule("moba"), 100, 0),  # resumed at the end: no step left
])
def test_dense_attention_max_len_over_the_steps_left(monkeypatch, schedule, first, expected):
    """The steps this launch trains decide: a run resumed past a schedule's last full-attention step has only
    MoBA layers left, whose dense part is their first top_k blocks."""
    monkeypatch.delenv("MOBA_DENSE_PATH", raising=False)
    cfgs = {i: MoBAConfig(block_size=512, top_k=8) for i in range(4)}
    assert dense_attention_max_len(131072, cfgs, 4, schedule, (first, 100)) == expected
    assert dense_attention_max_len(131072, {0: cfgs[0]}, 4, schedule, (first, 100)) == (expected and 131072)


class _FakeAttention(nn.Module):
    """What ``moba_core.hf.attention_modules`` finds: a module named ``...Attention`` with a ``layer_idx``."""

    def __init__(self, scaling, head_dim=None):
        super().__init__()
        self.layer_idx, self.scaling = 0, scaling
        if head_dim is not None:
            self.head_dim = head_dim


def _lm(heads, head_dim, scaling, path=("model", "layers"), config_head_dim=True, attn_head_dim=None):
    """An ``lm`` whose decoder layers sit at ``path`` (``lm.model.layers`` for Llama / Qwen2 / Mistral)."""
    lm, parent = nn.Module(), None
    lm.config = SimpleNamespace(num_attention_heads=heads, hidden_size=heads * head_dim,
                                **({"head_dim": head_dim} if config_head_dim else {}))
    parent = lm
    for name in path[:-1]:
        setattr(parent, name, nn.Module())
        parent = getattr(parent, name)
    layer = nn.Module()
    layer.self_attn = _FakeAttention(scaling, attn_head_dim)
    setattr(parent, path[-1], nn.ModuleList([layer]))
    return lm


@pytest.mark.parametrize("sp_size", [1, 2])
def test_warm_attention_plans_uses_each_ranks_call_shape(monkeypatch, sp_size):
    rec = _Keys(min_seqlen=256)
    seen = {}
    monkeypatch.setattr(varlen, "varlen_primitives", lambda device, dtype, head_dim: seen.update(
        dtype=dtype, head_dim=head_dim) or rec)
    orig = rec.warmup
    monkeypatch.setattr(rec, "warmup", lambda *a, **k: seen.update(scale=a[5]) or orig(*a, **k))
    built, secs = warm_attention_plans(_lm(8, 16, 0.3), 700, sp_size, torch.device("cpu"), torch.float32)
    assert built == rec.plan_lengths(700) == rec.bwd_lengths and secs >= 0
    assert seen == {"dtype": torch.float32, "head_dim": 16, "scale": 0.3}  # the model's own softmax scale
    assert {k[1][0][1] for k in rec.keys} == {8 // sp_size}  # Ulysses: each rank attends heads / sp_size


def test_warm_attention_plans_is_a_no_op_without_cudnn():
    # on the CPU the dense primitive is TorchVarlen: nothing to build
    assert warm_attention_plans(_lm(8, 16, 0.25), 1 << 20, 1, torch.device("cpu")) == ([], 0.0)


@pytest.mark.parametrize("path, config_head_dim, attn_head_dim", [
    (("model", "decoder", "layers"), True, None),  # OPT-like: lm.model has no .layers
    (("transformer", "h"), True, None),  # GPT-2-like: no lm.model at all
    (("model", "layers"), False, 16),  # a config without head_dim; the module has its own
])
def test_warm_attention_plans_finds_the_attention_modules(monkeypatch, path, config_head_dim, attn_head_dim):
    rec = _Keys(min_seqlen=256)
    seen = {}
    monkeypatch.setattr(varlen, "varlen_primitives", lambda device, dtype, head_dim: seen.update(
        head_dim=head_dim) or rec)
    orig = rec.warmup
    monkeypatch.setattr(rec, "warmup", lambda *a, **k: seen.update(scale=a[5]) or orig(*a, **k))
    # hidden_size / heads = 32 where the config has no head_dim: the module's 16 is what attention gets
    lm = _lm(8, 16 if config_head_dim else 32, 0.3, path, config_head_dim, attn_head_dim)
    built, _ = warm_attention_plans(lm, 300, 1, torch.device("cpu"), torch.float32)
    assert built == rec.plan_lengths(300) and seen == {"head_dim": 16, "scale": 0.3}
