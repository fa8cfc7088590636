"""train.recompute_attention=false: activation checkpointing keeps the attention kernels' outputs from the forward
(selective checkpointing, ``train.model.checkpointing_kwargs``) instead of running them again in the recompute.
MoBA's Triton forward is two dispatcher ops (``torch.ops.moba.route`` and ``torch.ops.moba.triton_fwd``) for this;
``train.recompute_routing=false`` keeps the first only. Here they run under the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as tests/kernels/conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from moba_core import MoBAConfig, triton_backend  # noqa: E402
from moba_core.hf import apply_moba  # noqa: E402
from train.model import (  # noqa: E402
    PackedCausalLM,
    checkpointing_kwargs,
    enable_activation_checkpointing,
    keep_attention_policy,
    keep_routing_policy,
)

from .test_fused_ops import loss_and_grads, packed_batch  # noqa: E402


def model(recompute_attention: bool | None, recompute_routing: bool = True):
    """A tiny Llama (2 layers, GQA 4/2), MoBA block 16 top-2 (triton backend) in both layers, float32."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = LlamaForCausalLM(cfg)
    apply_moba(lm, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[], backend="triton"))
    if recompute_attention is not None:  # None: no checkpointing
        enable_activation_checkpointing(lm, recompute_attention, recompute_routing)
    lm.train()
    return PackedCausalLM(lm, loss_chunk_tokens=64)


@pytest.fixture
def calls(monkeypatch):
    """Counts MoBA's routing (``moba_routing``) and attention kernels with the dense prefixes (``_attend``)."""
    seen = {"routing": 0, "attend": 0}

    def counting(name, inner):
        def counted(*args, **kwargs):
            seen[name] += 1
            return inner(*args, **kwargs)
        return counted

    for name, attr in (("routing", "moba_routing"), ("attend", "_attend")):
        monkeypatch.setattr(triton_backend, attr, counting(name, getattr(triton_backend, attr)))
    return seen


@pytest.mark.parametrize("setting, routing, attend", [
    (None, 2, 2),                             # no checkpointing: one forward per layer
    (dict(recompute_attention=True), 4, 4),   # forward and recompute, both layers
    (dict(recompute_attention=False), 2, 2),  # the recompute reused the kept outputs
    (dict(recompute_attention=True, recompute_routing=False), 2, 4),  # routing kept, kernels run again
])
def test_kept_outputs_run_once_and_give_the_same_gradients(calls, setting, routing, attend):
    batch = packed_batch()
    (ref, *_), g_ref = loss_and_grads(model(None), batch)
    calls.update(routing=0, attend=0)
    (loss, *_), grads = loss_and_grads(model(**setting) if setting else model(None), batch)
    assert calls == {"routing": routing, "attend": attend}
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for k in g_ref:
        torch.testing.assert_close(grads[k], g_ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_policy_keeps_only_attention_ops():
    from torch.utils.checkpoint import CheckpointPolicy

    keep, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    assert keep_attention_policy(None, torch.ops.moba.triton_fwd.default) == keep
    assert keep_attention_policy(None, torch.ops.moba.route.default) == keep
    assert keep_routing_policy(None, torch.ops.moba.route.default) == keep
    assert keep_routing_policy(None, torch.ops.moba.triton_fwd.default) == again
    assert keep_routing_policy(None, torch.ops.aten._scaled_dot_product_cudnn_attention.default) == again
    assert keep_attention_policy(None, torch.ops.aten._scaled_dot_product_cudnn_attention.default) == keep
    assert keep_attention_policy(None, torch.ops.aten._flash_attention_forward.default) == keep
    for op in (torch.ops.aten.mm.default, torch.ops.aten._flash_attention_backward.default,
               torch.ops.aten.silu.default):
        assert keep_attention_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE
    assert checkpointing_kwargs() == {"use_reentrant": False}
    assert checkpointing_kwargs(recompute_routing=False)["context_fn"].args == (keep_routing_policy,)
    assert checkpointing_kwargs(False, False)["context_fn"].args == (keep_attention_policy,)


def test_training_run_with_kept_attention(tmp_path, data_cache):
    """``python -m train`` wires the setting into every layer's checkpoint (a CPU run: its dense attention is
    exact PyTorch, no kept op, so the losses equal those of the plain checkpointed run)."""
    from .conftest import read_metrics, run_train

    common = ["train.activation_checkpointing=true", "train.max_steps=2", "moba.full_attn_layers=1"]
    run_train(common, tmp_path / "recompute", data_cache)
    proc = run_train([*common, "train.recompute_attention=false"], tmp_path / "kept", data_cache)
    assert "keeps the attention outputs (train.recompute_attention=false)" in proc.stdout + proc.stderr
    a, b = read_metrics(tmp_path / "recompute"), read_metrics(tmp_path / "kept")
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-6)


def test_kept_routing_reason_names_why_nothing_is_kept():
    """``train.recompute_routing=false`` keeps the routing only where ``torch.ops.moba.route`` runs: MoBA layers on
    the triton backend at head dims up to 128, at some step of the schedule; otherwise the log says why not."""
    from moba_core.schedule import Schedule
    from train.model import kept_routing_reason

    cpu, moba, steps = torch.device("cpu"), Schedule("moba"), (0, 10)
    assert kept_routing_reason("triton", cpu, 64, [0, 1], moba, 2, steps) is None  # under the interpreter
    assert "runs the flash backend on cpu" in kept_routing_reason("flash", cpu, 64, [0, 1], moba, 2, steps)
    assert "head dim 256 > 128" in kept_routing_reason("triton", cpu, 256, [0, 1], moba, 2, steps)
    assert "schedule=full" in kept_routing_reason("triton", cpu, 64, [0, 1], Schedule("full"), 2, steps)
    assert kept_routing_reason("triton", cpu, 64, [0, 1], Schedule("full_then_moba"), 2, steps) is None
    assert "no layer runs MoBA" in kept_routing_reason("triton", cpu, 64, [], moba, 2, steps)
    assert "schedule=full" in kept_routing_reason("bogus", cpu, 64, [0, 1], Schedule("full"), 2, steps)  # not reached
    assert "must be one of" in kept_routing_reason("bogus", cpu, 64, [0, 1], moba, 2, steps)  # a reason, not a crash
    # a launch that resumes past the switch of moba_then_full (MoBA for the first 40% of 10 steps) runs no MoBA
    # layer: only its own steps count
    sparse_first = Schedule("moba_then_full", switch_fraction=0.4)
    assert kept_routing_reason("triton", cpu, 64, [0, 1], sparse_first, 2, (0, 10)) is None
    why = kept_routing_reason("triton", cpu, 64, [0, 1], sparse_first, 2, (5, 10))
    assert "no layer runs MoBA in steps 6-10" in why


def test_moba_layers_at_ends():
    from moba_core.schedule import Schedule
    from train.model import moba_layers_at_ends

    half = Schedule("full_then_moba", switch_fraction=0.5)
    assert moba_layers_at_ends(half, [2, 0, 1], 3, (0, 10)) == [[], [0, 1, 2]]
    assert moba_layers_at_ends(half, [0, 1, 2], 3, (6, 10)) == [[0, 1, 2], [0, 1, 2]]  # resumed past the switch
    assert moba_layers_at_ends(Schedule("moba"), [0, 1], 2, (10, 10)) == []  # no step left


def test_model_head_dim_takes_the_attention_modules_then_a_set_config_value():
    """A head dim that is not hidden_size / heads (Llama's head_dim setting) and a config whose head_dim is None:
    the MFU counter used to multiply by None there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.model import model_head_dim

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32)
    lm = LlamaForCausalLM(cfg)
    assert model_head_dim(lm) == 32  # not 64 // 4
    lm.config.head_dim = None
    assert model_head_dim(lm) == 32  # the attention module's own
    for layer in lm.model.layers:
        del layer.self_attn.head_dim
    assert model_head_dim(lm) == 16  # config None: hidden_size // heads
    lm.config.head_dim = 32
    assert model_head_dim(lm) == 32


def test_training_log_says_when_the_kept_routing_has_no_effect(tmp_path, data_cache):
    """A CPU run's default backend is ``flash`` (routing inside its call), and without checkpointing nothing is
    recomputed: the log says the setting has no effect instead of claiming the routing is kept."""
    from .conftest import run_train

    proc = run_train(["train.activation_checkpointing=true", "train.recompute_routing=false", "train.max_steps=1"],
                     tmp_path / "flash", data_cache)
    out = proc.stdout + proc.stderr
    assert "train.recompute_routing=false has no effect in this launch: moba.backend=auto runs the flash backend" in out
    assert "keeps MoBA's routing" not in out
    proc = run_train(["train.activation_checkpointing=false", "train.recompute_routing=false", "train.max_steps=1"],
                     tmp_path / "nockpt", data_cache)
    assert "have no effect without train.activation_checkpointing" in proc.stdout + proc.stderr
