"""model.fused_ops (Liger-Kernel) and model.compile against the plain PyTorch model: same loss, same gradients.

On the CPU, Liger's Triton kernels run under TRITON_INTERPRET=1 where the interpreter allows (RoPE and the
fused linear + cross-entropy; its RMSNorm and SwiGLU kernels do not run in the interpreter); all four are
checked in bf16 on a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as tests/kernels/conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from moba_core import MoBAConfig  # noqa: E402
from moba_core.hf import apply_moba  # noqa: E402
from train.config import ModelConfig  # noqa: E402
from train.model import (  # noqa: E402
    FUSED_OPS,
    PackedCausalLM,
    apply_fused_ops,
    compile_layers,
    fused_ops_enabled,
    prepare_layers,
)

pytest.importorskip("liger_kernel")


@pytest.fixture(autouse=True)
def restore_llama_module(monkeypatch):
    """Liger-Kernel patches transformers' llama module itself (``apply_rotary_pos_emb``, the ``LlamaRMSNorm`` and
    ``LlamaMLP`` classes), not only the model given: undone after each test, or every Llama built later in this
    pytest process (tests/train/test_model.py's) gets Liger's modules, whose RMSNorm fails in the CPU interpreter."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


def twin_models(backend="reference", device="cpu", dtype=torch.float32):
    """Two identical tiny Llamas (2 layers, GQA 4/2, MoBA block 16 top-2 in layer 0, full in layer 1)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    a = LlamaForCausalLM(cfg)
    b = LlamaForCausalLM(cfg)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[1], backend=backend))
    return a.to(device, dtype), b.to(device, dtype)


def packed_batch(device="cpu"):
    """Two documents (40 and 24 tokens) in one row; the last label of each is ignored."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (1, 64), generator=g)
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None]
    labels = torch.roll(ids, -1, 1)
    labels[0, 39] = labels[0, 63] = -100
    cu = torch.tensor([0, 40, 64], dtype=torch.int32)
    return [x.to(device) for x in (ids, labels, pos, cu)]


def loss_and_grads(model, batch):
    ids, labels, pos, cu = batch
    total, n, tail, n_tail = model(ids, labels, pos, cu, 40, tail_from=20)
    (total / n).backward()
    return (total, n, tail, n_tail), {k: p.grad.float().clone() for k, p in model.named_parameters()}


def test_fused_rope_and_loss_equal_unfused_on_the_cpu():
    from transformers.models.llama import modeling_llama

    a, b = twin_models()
    batch = packed_batch()
    # a first: Liger patches RoPE into transformers' module, which both models' layers look up when called
    (ta, na, tla, ntla), ga = loss_and_grads(PackedCausalLM(a, loss_chunk_tokens=7), batch)
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__
    apply_fused_ops(b, ("rope",))
    assert modeling_llama.apply_rotary_pos_emb.__module__ != modeling_llama.__name__
    (tb, nb, tlb, ntlb), gb = loss_and_grads(PackedCausalLM(b, loss_chunk_tokens=7, fused_loss=True), batch)
    # 40 + 24 labels, 2 ignored; at document positions >= 20: 20 + 4, the same 2 ignored
    assert (na, ntla) == (nb, ntlb) == (62, 22)
    torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tlb, tla, rtol=1e-5, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fused_loss_with_no_valid_label_is_zero_and_in_the_graph():
    _, b = twin_models()
    ids, labels, pos, cu = packed_batch()
    total, n = PackedCausalLM(b, fused_loss=True)(ids, torch.full_like(labels, -100), pos, cu, 40)
    assert total.item() == 0.0 and n.item() == 0 and total.requires_grad
    total.backward()
    assert b.model.embed_tokens.weight.grad.abs().sum() == 0


def test_compiled_layers_equal_eager_and_keep_parameter_names():
    a, b = twin_models()
    names = list(b.state_dict())
    assert compile_layers(b) == 2
    assert list(b.state_dict()) == names  # checkpoints and ZeRO see the same parameters
    batch = packed_batch()
    (ta, *_), ga = loss_and_grads(PackedCausalLM(a), batch)
    (tb, *_), gb = loss_and_grads(PackedCausalLM(b), batch)
    torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_with_fused_ops_keeps_liger_out_of_the_layers():
    """model.compile with model.fused_ops: dynamo failed on Liger's RMSNorm Function inside a compiled layer on an
    H200, so the compiled layers keep PyTorch's ops (the compiler fuses them); without compile they are Liger's."""
    from transformers.models.llama import modeling_llama

    a, b = twin_models()
    # b first: Liger's RoPE is patched into transformers' module (the layers look it up when called), by a's turn
    assert "compiled" in prepare_layers(b, fused_ops=True, compile=True)
    assert liger_modules(b) == []
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__
    (tb, *_), _ = loss_and_grads(PackedCausalLM(b, fused_loss=True), packed_batch())
    assert torch.isfinite(tb)
    assert "Liger-Kernel fused" in prepare_layers(a, fused_ops=True, compile=False)
    assert liger_modules(a.model.layers) == ["LigerRMSNorm", "LigerSwiGLUMLP"]


def liger_modules(m):
    """Names of the Liger-Kernel modules in ``m`` (Liger patches the instances' forward methods)."""
    names = {getattr(x.forward, "__qualname__", "").split(".")[0] for x in m.modules()}
    return sorted(n for n in names if n.startswith("Liger"))


def test_a_model_built_after_a_fused_one_is_unfused():
    """Liger-Kernel replaces classes and RoPE in transformers' llama module itself: a model built after a fused
    one in the same process (the next job of an in-process sweep with model.fused_ops=false, or with
    model.compile=true, where dynamo fails on Liger's RMSNorm) got Liger's RMSNorm and SwiGLU modules."""
    from transformers.models.llama import modeling_llama

    from train.model import build_model

    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=256, fused_ops=False)
    originals = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    fused = build_model(cfg, 96)
    apply_fused_ops(fused)
    assert liger_modules(fused.model.layers) == ["LigerRMSNorm", "LigerSwiGLUMLP"]
    assert all(getattr(modeling_llama, n) is not o for n, o in originals.items())  # the module is patched
    plain = build_model(cfg, 96)
    assert liger_modules(plain) == []
    assert all(getattr(modeling_llama, n) is o for n, o in originals.items())
    assert liger_modules(fused.model.layers) == ["LigerRMSNorm", "LigerSwiGLUMLP"]  # the fused model keeps its own
    apply_fused_ops(plain)  # and fusing again still works
    assert liger_modules(plain.model.layers) == ["LigerRMSNorm", "LigerSwiGLUMLP"]
    assert modeling_llama.apply_rotary_pos_emb is not originals["apply_rotary_pos_emb"]


def test_fused_ops_setting(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU is used
    assert fused_ops_enabled("auto", cpu, "llama") is False  # the GPU default, off on a CPU
    assert fused_ops_enabled(False, cpu, "llama") is False
    assert fused_ops_enabled("auto", gpu, "llama") is True
    # auto on a GPU stays unfused for an architecture Liger-Kernel does not patch (it used to fail after the
    # data build); true refuses it, naming the setting and the model type
    assert fused_ops_enabled("auto", gpu, "olmo") is False
    assert fused_ops_enabled(False, gpu, "olmo") is False
    with pytest.raises(ValueError, match="model.fused_ops=true: Liger-Kernel has no fused ops for model_type='olmo'"):
        fused_ops_enabled(True, gpu, "olmo")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="model.fused_ops=true needs a GPU"):
        fused_ops_enabled(True, cpu, "llama")
    with pytest.raises(ValueError, match="model.fused_ops='yes' must be auto, true or false"):
        ModelConfig(fused_ops="yes")
    with pytest.raises(ValueError, match=r"fused ops \['layernorm'\] are not among"):
        apply_fused_ops(twin_models()[1], ("layernorm",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_all_fused_ops_equal_unfused_in_bf16_on_the_gpu():
    a, b = twin_models(backend="auto", device="cuda", dtype=torch.bfloat16)
    batch = packed_batch("cuda")
    (ta, _, tla, _), ga = loss_and_grads(PackedCausalLM(a), batch)  # before Liger's RoPE is patched in
    apply_fused_ops(b, FUSED_OPS)
    (tb, _, tlb, _), gb = loss_and_grads(PackedCausalLM(b, fused_loss=True), batch)
    torch.testing.assert_close(tb, ta, rtol=2e-2, atol=0)
    torch.testing.assert_close(tlb, tla, rtol=2e-2, atol=0)
    for k in ga:
        rel = (gb[k] - ga[k]).norm() / ga[k].norm().clamp_min(1e-12)
        assert rel < 5e-2, (k, rel.item())
