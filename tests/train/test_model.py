"""The chunked loss and the FLOP accounting, against direct computations and hand-worked counts."""

import torch
import torch.nn.functional as F

from train.model import attended_keys, chunked_cross_entropy


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
    assert none.item() == 0.0


def test_attended_keys_hand_worked():
    cu = torch.tensor([0, 5, 5, 8], dtype=torch.int32)  # documents of 5, 0 and 3 tokens
    assert attended_keys(cu, None, 1) == 15 + 6  # causal: 1+2+3+4+5 and 1+2+3
    # block 2, top-2: in the 5-token doc, positions 0,1 see 1,2 keys; 2,3 see 1,2 + one earlier block (2);
    # 4 sees 1 + 2. The 3-token doc: 1, 2, then 1 + 2.
    assert attended_keys(cu, 2, 2) == (1 + 2 + 3 + 4 + 3) + (1 + 2 + 3)
    assert attended_keys(cu, 2, 1) == (1 + 2 + 1 + 2 + 1) + (1 + 2 + 1)
