"""The chunked loss and the FLOP accounting, against direct computations and hand-worked counts."""

import pytest
import torch
import torch.nn.functional as F

from train.model import attended_keys, chunked_cross_entropy, count_params, step_flops


def test_chunked_cross_entropy_equals_full_and_survives_empty_chunks():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (50,), generator=g)
    labels[10:30] = -100  # chunks 2 and 3 (chunk 10) have no valid label at all
    got = chunked_cross_entropy(hidden, weight, labels, chunk=10)
    want = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, want)
    ga = torch.autograd.grad(got, (hidden, weight))
    gb = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    none = chunked_cross_entropy(hidden, weight, torch.full((50,), -100), chunk=10)
    assert none.item() == 0.0 and none.requires_grad  # still in the graph: the rank runs backward
    assert torch.autograd.grad(none, hidden)[0].abs().sum() == 0


def test_attended_keys_hand_worked():
    cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32)  # documents of 5, 0 and 3 tokens
    assert attended_keys(cu, None, 1) == 15 + 6  # causal: 1+2+3+4+5 and 1+2+3
    # block 2, top-2: in the 5-token doc, positions 0,1 see 1,2 keys; 2,3 see 1,2 + one earlier block (2);
    # 4 sees 1 + 2. The 3-token doc: 1, 2, then 1 + 2.
    assert attended_keys(cu, 2, 2) == (1 + 2 + 3 + 4 + 3) + (1 + 2 + 3)
    assert attended_keys(cu, 2, 1) == (1 + 2 + 1 + 2 + 1) + (1 + 2 + 1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_step_flops_on_known_shapes(tied):
    """Hand-counted: hidden 64, MLP 128, 2 layers, 4 query heads and 2 KV heads of 16, vocab 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    per_layer = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64  # q, k, v, o; MLP; two RMSNorms
    n = 2 * per_layer + 64  # + final norm; neither embedding nor LM head, tied or not
    assert count_params(lm, exclude_embeddings=True) == n == 74048
    assert count_params(lm) == n + 100 * 64 * (1 if tied else 2)
    cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32)  # 8 tokens: documents of 5, 0 and 3
    full_pairs, moba_pairs = 15 + 6, (1 + 2 + 3 + 4 + 3) + (1 + 2 + 3)  # as in test_attended_keys_hand_worked
    # layer 0 MoBA (block 2, top 2), layer 1 full; q_dim = 4 heads x 16
    want = 6 * (74048 + 100 * 64) * 8 + 12 * 64 * (moba_pairs + full_pairs)
    got = step_flops(count_params(lm, exclude_embeddings=True), 8, 2, 64, attended_keys(cu, None, 1),
                     [attended_keys(cu, 2, 2)], 100, 64)
    assert got == want
    assert step_flops(n, 8, 2, 64, full_pairs, [], 100, 64) == 6 * (74048 + 6400) * 8 + 12 * 64 * 2 * full_pairs


def test_packed_lm_trailing_loss_counts_only_late_document_positions():
    from transformers import LlamaConfig, LlamaForCausalLM

    from moba_core import MoBAConfig
    from moba_core.hf import apply_moba
    from train.model import PackedCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    apply_moba(lm, MoBAConfig(block_size=16, top_k=2))
    model = PackedCausalLM(lm, loss_chunk_tokens=7)
    ids = torch.randint(0, 50, (1, 40))
    pos = torch.cat([torch.arange(30), torch.arange(10)])[None]
    labels = torch.cat([ids[0, 1:30], torch.tensor([-100]), ids[0, 31:40], torch.tensor([-100])])[None]
    cu = torch.tensor([0, 30, 40], dtype=torch.int32)
    with torch.no_grad():
        total, n, tail, n_tail = model(ids, labels, pos, cu, 30, tail_from=20)
        logits = torch.cat([lm(ids[:, :30]).logits[0], lm(ids[:, 30:]).logits[0]])
    per_token = F.cross_entropy(logits, labels[0], ignore_index=-100, reduction="none")
    assert int(n) == 38 and int(n_tail) == 9  # positions 20..28 of the first document have labels
    torch.testing.assert_close(total, per_token.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail, per_token[20:29].sum(), rtol=1e-5, atol=1e-5)
