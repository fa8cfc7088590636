"""Queries shorter than keys (chunked prefill, decoding with a KV cache) and padded batches: the cached path
must give what recomputing the whole sequence gives, and a padded row what the row gives alone."""

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moba_core import MoBAConfig, moba_attention, moba_attention_reference
from moba_core.decode import BlockMeansCache, full_block_means, moba_attention_kv
from moba_core.hf import apply_moba


def tiny_llama(seed=0, layers=3, heads=4, kv_heads=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def last_rows(cu, n):
    """Indices of the last n positions of every document, and their offsets."""
    lens = (cu[1:] - cu[:-1]).tolist()
    lq = [min(n, L) for L in lens]
    idx = torch.cat([torch.arange(e - m, e) for e, m in zip(cu[1:].tolist(), lq)])
    return idx, torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32)


@pytest.mark.parametrize("lens,hq,hkv,top_k,group", [
    pytest.param([100, 0, 77, 9], 6, 2, 3, False, id="packed-gqa"),
    pytest.param([130], 4, 4, 2, True, id="group-routing"),
    pytest.param([70, 33], 4, 2, 1, False, id="topk1"),
    pytest.param([60], 2, 1, 12, False, id="topk-above-blocks"),
])
@pytest.mark.parametrize("n_queries", [1, 7, 40])
def test_last_queries_equal_the_full_forward(lens, hq, hkv, top_k, group, n_queries):
    g = torch.Generator().manual_seed(1)
    T = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, 32, generator=g) for h in (hq, hkv, hkv))
    ref = moba_attention_reference(q, k, v, cu, max(lens), 16, top_k, group_routing=group)
    idx, cu_q = last_rows(cu, n_queries)
    o = moba_attention(q[idx], k, v, cu_q, n_queries, 16, top_k, group_routing=group, cu_seqlens_k=cu,
                       backend="flash")
    torch.testing.assert_close(o, ref[idx], atol=2e-6, rtol=1e-5)


def test_full_decode_is_causal_attention_and_gradients_flow():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(90, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 90], dtype=torch.int32)
    idx, cu_q = last_rows(cu, 5)
    o = moba_attention_kv(q[idx], k, v, cu_q, cu, 16, 2, full=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                             is_causal=True).transpose(0, 1)
    torch.testing.assert_close(o, dense[idx], atol=1e-6, rtol=1e-5)
    o.sum().backward()
    assert k.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()


def test_kv_errors_name_the_argument():
    q, k = torch.randn(10, 2, 16), torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="document 0 has 10 queries but only 5 keys"):
        moba_attention_kv(q, k, k, torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32),
                          16, 2)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        moba_attention_kv(q, k, k, torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32),
                          16, 2)


def test_block_means_cache_is_incremental_and_restarts():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(100, 2, 8, generator=g)
    cache = BlockMeansCache(16)
    for n in (20, 33, 47, 48, 80, 100):
        got = cache.get([keys[:n]])[0]
        torch.testing.assert_close(got, full_block_means(keys[:n], 16), atol=0, rtol=0)
    other = torch.randn(40, 2, 8, generator=g)
    torch.testing.assert_close(cache.get([other])[0], full_block_means(other, 16), atol=0, rtol=0)


@pytest.mark.parametrize("prompt_len,cfg", [
    pytest.param(10, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[-1]), id="prompt-shorter-than-block"),
    pytest.param(70, MoBAConfig(block_size=16, top_k=3, full_attn_layers=[-1]), id="prompt-over-topk-blocks"),
    pytest.param(50, MoBAConfig(block_size=16, top_k=2, group_routing=True), id="group-routing"),
])
def test_generation_with_cache_equals_recompute(prompt_len, cfg):
    m = tiny_llama()
    m.generation_config.eos_token_id = None
    apply_moba(m, cfg)
    ids = torch.randint(1, 97, (1, prompt_len), generator=torch.Generator().manual_seed(4))  # 0 is the pad id
    with torch.no_grad():
        cached = m.generate(ids, max_new_tokens=25, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids
        for _ in range(25):  # recompute: the whole sequence every step, no cache
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_chunked_prefill_logits_equal_one_forward():
    m = tiny_llama(seed=5)
    apply_moba(m, MoBAConfig(block_size=16, top_k=2))
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = m(ids).logits
        out = m(ids[:, :50], use_cache=True)
        rest = m(ids[:, 50:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(rest, whole[:, 50:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(side):
    m = tiny_llama(seed=6)
    apply_moba(m, MoBAConfig(block_size=16, top_k=2, full_attn_layers=[-1]))
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, 97, (n,), generator=gen) for n in (70, 41)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = m(ids, attention_mask=mask, position_ids=pos).logits
        for b, r in enumerate(rows):
            alone = m(r[None]).logits[0]
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(batched[b, sl], alone, atol=2e-5, rtol=1e-4)


def test_left_padded_generation_equals_rows_alone():
    m = tiny_llama(seed=7)
    m.generation_config.eos_token_id = None  # compare all 12 tokens, also after an end-of-text id
    apply_moba(m, MoBAConfig(block_size=16, top_k=2))
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 97, (n,), generator=gen) for n in (40, 23)]
    T = 40
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    with torch.no_grad():
        batched = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for b, r in enumerate(rows):
            alone = m.generate(r[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[b, T:], alone[0, len(r):]), b


def test_padding_between_real_tokens_is_refused():
    m = tiny_llama(seed=8)
    apply_moba(m, MoBAConfig(block_size=16, top_k=2))
    ids = torch.randint(1, 97, (1, 20))
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding between real tokens"):
        m(ids, attention_mask=mask)
