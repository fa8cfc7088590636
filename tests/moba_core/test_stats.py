"""Routing statistics (moba_core.stats): recall against full attention, chosen blocks, histograms."""

import math

import pytest
import torch

from moba_core.reference import _doc_selection_mask
from moba_core.stats import RoutingStats, attention_recall, chosen_block_mask


def _qk(L, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, Hq, D, generator=g), torch.randn(L, Hkv, D, generator=g)


def _recall_by_hand(q, k, positions, key_mask, scale):
    """Independent recall: dense softmax of q[p] (q: (L, H_q, D)) over the causal prefix, mass on key_mask[h, p]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    out = torch.zeros(Hq, len(positions))
    for h in range(Hq):
        kh = k[:, h // (Hq // Hkv)]
        for c, p in enumerate(positions.tolist()):
            w = torch.softmax((kh[: p + 1] @ q[p, h]) * scale, 0)
            out[h, c] = w[key_mask[h, p, : p + 1]].sum()
    return out


@pytest.mark.parametrize("group_routing", [pytest.param(False, id="per-head"), pytest.param(True, id="group")])
def test_recall_matches_reference_mask_and_is_below_one(group_routing):
    L, bs, top_k = 150, 16, 3  # 9 full blocks + a partial one
    q, k = _qk(L)
    pos = torch.tensor([0, 15, 16, 40, 63, 64, 100, 149])
    mask = chosen_block_mask(q[pos], k, pos, bs, top_k, group_routing)
    ref = _doc_selection_mask(q, k, bs, top_k, group_routing)  # (H_q, L, L) keys each query attends
    # The block mask expanded to keys (causally) is the reference's key mask.
    keys = mask.repeat_interleave(bs, -1)[..., :L] & (torch.arange(L)[None, None, :] <= pos[None, :, None])
    assert torch.equal(keys, ref[:, pos])
    scale = 1 / math.sqrt(16)
    rec = attention_recall(q[pos], k, pos, mask, bs)
    torch.testing.assert_close(rec, _recall_by_hand(q, k, pos, ref, scale), rtol=1e-5, atol=1e-6)
    assert torch.all(rec[:, :4] > 1 - 1e-6)  # queries of the first top_k blocks (p < 48) attend their whole prefix
    assert float(rec[:, 4:].min()) < 0.99  # later queries leave blocks out


def test_recall_is_one_when_top_k_covers_every_block():
    L, bs = 100, 16  # 7 blocks: top_k 7 covers all of them
    q, k = _qk(L, seed=1)
    stats = RoutingStats(bs, top_k=7)
    stats.update(q[20:], k, torch.arange(20, L))
    s = stats.summary()
    assert s["recall"] == pytest.approx(1.0, abs=1e-6) and s["queries"] == 4 * 80
    small = RoutingStats(bs, top_k=2)
    small.update(q[20:], k, torch.arange(20, L))
    assert small.summary()["recall"] < 1 - 1e-3


def test_histograms_count_chosen_blocks():
    """top_k 2: every query past the first block chooses exactly one earlier full block."""
    L, bs = 64, 16
    q, k = _qk(L, Hq=2, Hkv=1, seed=2)
    pos = torch.tensor([5, 20, 40, 63])  # own blocks 0, 1, 2, 3
    stats = RoutingStats(bs, top_k=2, query_chunk=3)  # two chunks
    stats.update(q[pos], k, pos)
    s = stats.summary()
    mask = chosen_block_mask(q[pos], k, pos, bs, 2)
    want_dist = [0, 0, 0, 0]
    want_chosen = [0, 0, 0, 0]
    for h in range(2):
        for c, b in enumerate([0, 1, 2, 3]):
            for i in range(b):
                if mask[h, c, i]:
                    want_dist[b - i] += 1
                    want_chosen[i] += 1
    assert sum(want_chosen) == 2 * 3  # one chosen block per head for the 3 queries past block 0
    assert s["distance_hist"] + [0] * (4 - len(s["distance_hist"])) == want_dist
    assert s["block_chosen"] == want_chosen
    assert s["block_candidate"] == [2 * 3, 2 * 2, 2 * 1, 0]  # block i is a candidate of queries in later blocks
    assert s["block_rate"][3] is None


def test_bad_arguments():
    q, k = _qk(32)
    with pytest.raises(ValueError, match="block_size=24"):
        chosen_block_mask(q, k, torch.arange(32), 24, 2)
    with pytest.raises(ValueError, match="positions"):
        chosen_block_mask(q, k, torch.arange(1, 33), 16, 2)
