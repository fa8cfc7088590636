"""MoBA backends against the dense reference, hand-worked cases and the API's argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from moba_core import moba_attention, moba_attention_reference
from moba_core.flash import varlen_causal_attention

CPU_BACKENDS = ["flash"]


def make_inputs(lens, Hq, Hkv, D, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).requires_grad_(requires_grad) for h in (Hq, Hkv, Hkv))
    return q, k, v, cu, max(max(lens), 1)


def grads(o, inputs, seed=1):
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype)
    return torch.autograd.grad(o, inputs, do)


def causal_dense(q, k, v, cu, scale=None):
    """Independent dense causal attention per document (SDPA, float32, k/v expanded for GQA)."""
    g = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        qd, kd, vd = (x[s:e].float().transpose(0, 1) for x in (q, k, v))
        kd, vd = kd.repeat_interleave(g, 0), vd.repeat_interleave(g, 0)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)


CASES = [
    pytest.param([300], 4, 2, 32, 32, 3, False, id="one-doc-gqa2"),
    pytest.param([1, 113, 0, 147, 123], 9, 3, 64, 16, 3, False, id="pack-odd-lens-zero-len-gqa3"),
    pytest.param([147, 200], 9, 3, 64, 16, 1, False, id="top1"),
    pytest.param([147, 200], 9, 3, 64, 16, 20, False, id="topk-over-blocks"),
    pytest.param([500], 4, 4, 32, 32, 4, True, id="group-routing-mha"),
    pytest.param([113, 260, 10], 6, 2, 96, 32, 3, True, id="group-routing-gqa-d96"),
    pytest.param([1023, 1025], 2, 1, 128, 64, 5, False, id="long-d128"),
    pytest.param([5, 12, 3], 2, 2, 16, 16, 2, False, id="docs-shorter-than-block"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lens,Hq,Hkv,D,B,K,gr", CASES)
def test_matches_reference_fp32(backend, lens, Hq, Hkv, D, B, K, gr):
    q, k, v, cu, m = make_inputs(lens, Hq, Hkv, D, seed=sum(lens) + K)
    o = moba_attention(q, k, v, cu, m, B, K, group_routing=gr, backend=backend)
    o_ref = moba_attention_reference(q, k, v, cu, m, B, K, group_routing=gr)
    assert o.dtype == q.dtype and o.shape == q.shape
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b, name in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v)), "qkv"):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"d{name}")


def test_selected_part_split_into_several_calls(monkeypatch):
    """The selected-blocks part split into many varlen calls (rows cut inside groups) is still exact."""
    import moba_core.flash

    monkeypatch.setattr(moba_core.flash, "MAX_ROWS_PER_CALL", 37)
    q, k, v, cu, m = make_inputs([300, 211], 6, 2, 32)
    o = moba_attention(q, k, v, cu, m, 32, 4, backend="flash")
    o_ref = moba_attention_reference(q, k, v, cu, m, 32, 4)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(o, (q, k, v)), grads(o_ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_noncontiguous_and_custom_scale():
    q, k, v, cu, m = make_inputs([200, 90], 4, 2, 32)
    qt = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided view
    assert not qt.is_contiguous()
    o = moba_attention(qt, k, v, cu, m, 32, 3, softmax_scale=0.3, backend="flash")
    o_ref = moba_attention_reference(qt, k, v, cu, m, 32, 3, softmax_scale=0.3)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_scales_like_pytorch(dtype):
    """The backend in fp16/bf16 stays within 2x the error of the reference run in that dtype (+ floor)."""
    q, k, v, cu, m = make_inputs([150, 70], 4, 2, 32)
    ref = moba_attention_reference(q, k, v, cu, m, 16, 3)
    ql, kl, vl = (x.detach().to(dtype) for x in (q, k, v))
    o = moba_attention(ql, kl, vl, cu, m, 16, 3, backend="flash")
    o_ref_low = moba_attention_reference(ql, kl, vl, cu, m, 16, 3)
    assert o.dtype == dtype
    err = (o.float() - ref).abs().max()
    err_pt = (o_ref_low.float() - ref).abs().max()
    assert err <= 2 * err_pt + 1e-3


def test_top1_is_current_block_only_hand_worked():
    """top_k=1: a query attends only its own block, causally (not full attention)."""
    q, k, v, cu, m = make_inputs([64], 2, 2, 16)
    o = moba_attention(q, k, v, cu, m, 16, 1, backend="flash")
    one = torch.tensor([0, 16])
    blocks = [causal_dense(q[s : s + 16], k[s : s + 16], v[s : s + 16], one) for s in range(0, 64, 16)]
    torch.testing.assert_close(o, torch.cat(blocks), atol=1e-5, rtol=1e-5)
    full = causal_dense(q, k, v, cu)
    assert (o - full).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_at_most_top_k_blocks_is_full_causal(backend):
    """A sequence of at most top_k blocks gets exactly full causal attention, per document."""
    q, k, v, cu, m = make_inputs([96, 40, 17], 6, 3, 32)
    o = moba_attention(q, k, v, cu, m, 32, 3, backend=backend)
    torch.testing.assert_close(o, causal_dense(q, k, v, cu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_small_top_k_differs_from_full(backend):
    q, k, v, cu, m = make_inputs([256], 2, 2, 16)
    o = moba_attention(q, k, v, cu, m, 32, 2, backend=backend)
    assert (o - causal_dense(q, k, v, cu)).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_documents_are_independent(backend):
    """A packed batch equals each document run alone."""
    q, k, v, cu, m = make_inputs([150, 77, 200], 4, 2, 32)
    o = moba_attention(q, k, v, cu, m, 32, 3, backend=backend)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = torch.tensor([0, e - s], dtype=torch.int32)
        o_d = moba_attention(q[s:e], k[s:e], v[s:e], one, e - s, 32, 3, backend=backend)
        torch.testing.assert_close(o[s:e], o_d, atol=1e-6, rtol=1e-6)


def test_hand_worked_routing_choice():
    """Keys built so that block 1 scores highest for the last block's queries; top_k=2 must pick it."""
    D, B = 16, 16
    T = 4 * B
    k = torch.zeros(T, 1, D)
    k[B : 2 * B, 0, 0] = 1.0  # block 1's mean key points along e0
    k[2 * B : 3 * B, 0, 1] = 1.0  # block 2 along e1
    q = torch.zeros(T, 1, D)
    q[:, 0, 0] = 1.0  # every query prefers block 1 (score 1 vs 0)
    v = torch.randn(T, 1, D)
    cu = torch.tensor([0, T], dtype=torch.int32)
    o = moba_attention(q, k, v, cu, T, B, 2, backend="flash")
    # The queries of block 3 attend block 1 and their own causal prefix; scores q.k are 1 on block 1.
    t = 3 * B + 5
    keys = list(range(B, 2 * B)) + list(range(3 * B, t + 1))
    logits = torch.tensor([float(q[t, 0] @ k[j, 0]) for j in keys]) / math.sqrt(D)
    expect = torch.softmax(logits, 0) @ v[keys, 0]
    torch.testing.assert_close(o[t, 0], expect, atol=1e-6, rtol=1e-6)


def test_unselected_block_gets_zero_grad():
    """A block that no query selects and no query attends as its own (top_k=1, nothing after it) gets
    exactly zero dk / dv from the other blocks, never NaN."""
    q, k, v, cu, m = make_inputs([64], 2, 1, 16)
    o = moba_attention(q, k, v, cu, m, 16, 2, backend="flash")
    # Block 3 (tokens 48..63) is the last block: never a candidate, so only its own queries use it.
    (o[:48].sum()).backward()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert k.grad[48:].abs().max() == 0 and v.grad[48:].abs().max() == 0


def test_full_attention_layer_path():
    q, k, v, cu, m = make_inputs([100, 0, 150], 4, 2, 16)
    o = varlen_causal_attention(q, k, v, cu, m)
    torch.testing.assert_close(o, causal_dense(q, k, v, cu), atol=1e-5, rtol=1e-5)
    ga = grads(o, (q, k, v))
    gb = grads(causal_dense(q, k, v, cu), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


BAD = [
    pytest.param(dict(block_size=0), "block_size=0", id="block0"),
    pytest.param(dict(block_size=48 + 1), "block_size=49", id="block-not-16"),
    pytest.param(dict(top_k=0), "top_k=0", id="topk0"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 50, 40, 100], dtype=torch.int32)), "non-decreasing", id="unsorted"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 100], dtype=torch.int64)), "int32", id="int64-cu"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 99], dtype=torch.int32)), "total_tokens=100", id="wrong-total"),
    pytest.param(dict(k=torch.randn(100, 3, 16)), "multiple of key/value heads", id="heads"),
    pytest.param(dict(max_seqlen=10), "max_seqlen=10", id="max-seqlen"),
    pytest.param(dict(backend="fast"), "backend='fast'", id="backend"),
    pytest.param(dict(softmax_scale=0.0), "softmax_scale=0.0", id="scale0"),
    pytest.param(dict(softmax_scale=-0.25), "softmax_scale=-0.25", id="scale-negative"),
    pytest.param(dict(softmax_scale=float("nan")), "softmax_scale=nan", id="scale-nan"),
    pytest.param(dict(softmax_scale=float("inf")), "softmax_scale=inf", id="scale-inf"),
    pytest.param(dict(softmax_scale=1e39), "that float32 holds", id="scale-above-fp32"),
    pytest.param(dict(softmax_scale=1e-46), "softmax_scale=1e-46", id="scale-below-fp32"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_arguments_name_the_value(override, message):
    args = dict(q=torch.randn(100, 4, 16), k=torch.randn(100, 2, 16), v=None,
                cu_seqlens=torch.tensor([0, 100], dtype=torch.int32), max_seqlen=100, block_size=32, top_k=2)
    args.update(override)
    if args["v"] is None:
        args["v"] = torch.randn_like(args["k"])
    backend = args.pop("backend", "flash")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        moba_attention(backend=backend, **args)


def test_cu_seqlens_read_once_per_tensor(monkeypatch):
    """The host copy of cu_seqlens is taken once per tensor (no wait for the GPU in later layers), taken again
    after an in-place change, and never shared between two tensors; results follow the current values."""
    from moba_core.layout import host_cu_seqlens

    reads = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.numel())
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    assert host_cu_seqlens(cu) == [0, 40, 100] and len(reads) == 1
    assert host_cu_seqlens(cu) == [0, 40, 100] and len(reads) == 1
    cu[1] = 60  # in place: the version counter moves
    assert host_cu_seqlens(cu) == [0, 60, 100] and len(reads) == 2
    other = torch.tensor([0, 10, 100], dtype=torch.int32)
    assert host_cu_seqlens(other) == [0, 10, 100] and len(reads) == 3
    with torch.inference_mode():
        inf = torch.tensor([0, 100], dtype=torch.int32)
        assert host_cu_seqlens(inf) == [0, 100] and host_cu_seqlens(inf) == [0, 100]
    monkeypatch.undo()
    # the attention itself follows the in-place change: documents [0, 60) and [60, 100)
    q, k, v, _, _ = make_inputs([60, 40], 2, 2, 16, requires_grad=False)
    first = moba_attention(q, k, v, cu, 60, 16, 2, backend="flash")
    want = moba_attention_reference(q, k, v, torch.tensor([0, 60, 100], dtype=torch.int32), 60, 16, 2)
    torch.testing.assert_close(first, want)
    cu[1] = 40
    second = moba_attention(q, k, v, cu, 60, 16, 2, backend="flash")
    torch.testing.assert_close(second, moba_attention_reference(q, k, v, cu.clone(), 60, 16, 2))
    assert not torch.allclose(first, second)
