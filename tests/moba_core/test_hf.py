"""MoBA inside a transformers Llama model: layer selection, packed documents, schedules, config checks."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moba_core import MoBAConfig
from moba_core.hf import apply_moba, attention_modules, set_moba_layers
from moba_core.schedule import moba_active


def tiny_llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def test_large_top_k_equals_sdpa_model():
    """With top_k covering every block MoBA is full causal attention: logits equal the SDPA model's."""
    m = tiny_llama()
    ids = torch.randint(0, 97, (2, 80))
    ref = m(ids).logits
    apply_moba(m, MoBAConfig(block_size=16, top_k=5))
    torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_small_top_k_changes_logits_and_full_layers_are_kept():
    m = tiny_llama()
    ids = torch.randint(0, 97, (1, 128))
    ref = m(ids).logits
    layers = apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[-1]))
    assert layers == [0, 1]
    assert [mod.moba_enabled for mod in attention_modules(m)] == [True, True, False]
    assert (m(ids).logits - ref).abs().max() > 1e-3
    set_moba_layers(m, [])
    torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_attend_across():
    """Packed call with cu_seqlens equals each document run alone (MoBA and full layers)."""
    m = tiny_llama()
    apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[2]))
    ids = torch.randint(0, 97, (1, 120))
    lens = [50, 3, 67]
    cu = torch.tensor([0, 50, 53, 120], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = m(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=67, max_length_k=67).logits
    alone = torch.cat([m(ids[:, s:e]).logits for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param(dict(block_size=0), "moba.block_size=0", id="block0"),
        pytest.param(dict(top_k=0), "moba.top_k=0", id="topk0"),
        pytest.param(dict(backend="cuda"), "moba.backend='cuda'", id="backend"),
    ],
)
def test_config_errors_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoBAConfig(**kwargs)


def test_full_attn_layer_out_of_range():
    with pytest.raises(ValueError, match="moba.full_attn_layers contains 5"):
        apply_moba(tiny_llama(), MoBAConfig(block_size=16, top_k=2, full_attn_layers=[5]))


@pytest.mark.parametrize(
    "name,expect",
    [
        pytest.param("moba", [True] * 10, id="moba"),
        pytest.param("full", [False] * 10, id="full"),
        pytest.param("full_then_moba", [False] * 3 + [True] * 7, id="full-then-moba"),
        pytest.param("moba_then_full", [True] * 3 + [False] * 7, id="moba-then-full"),
    ],
)
def test_schedules(name, expect):
    assert [moba_active(name, s, 10, 0.3) for s in range(10)] == expect


@pytest.mark.parametrize(
    "moba_layers",
    [
        pytest.param(None, id="moba-and-full-layers"),
        pytest.param([], id="all-full"),
    ],
)
def test_documents_given_by_restarting_position_ids_do_not_attend_across(moba_layers):
    """No cu_seq_lens (transformers' padding-free convention): position_ids restarting at 0 mark the
    documents of a row; each document's logits equal the document run alone, in MoBA and full layers."""
    m = tiny_llama()
    apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[2]))
    if moba_layers is not None:
        set_moba_layers(m, moba_layers)
    ids = torch.randint(0, 97, (1, 130))
    lens = [57, 73]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = m(ids, position_ids=pos).logits
        first, second = m(ids[:, :57]).logits, m(ids[:, 57:]).logits
    torch.testing.assert_close(packed[:, 57:], second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, :57], first, atol=1e-5, rtol=1e-5)


def test_cu_seqlens_from_position_ids_rows_and_restarts():
    from moba_core.hf import cu_seqlens_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # the second row starts mid-document
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 7, 10] and max_len == 3
