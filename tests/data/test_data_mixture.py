"""The training mixture: weights realised in tokens, length upsampling inside a source, budgets, errors."""

import numpy as np
import pytest

from data.mixture import long_share, select_source, source_budgets, take_tokens
from data.sources import LengthUpsample


def test_take_tokens_copies_then_closest_prefix():
    lengths = np.array([10, 20, 30, 40])
    rng = np.random.default_rng(0)
    picked = take_tokens(lengths, 250, rng)
    assert sorted(picked[:8].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # two full copies (200 tokens)
    rest = lengths[picked[8:]].sum()
    assert abs(rest - 50) <= 20  # within half of the longest document of the 50 left
    assert len(set(picked[8:].tolist())) == len(picked) - 8  # the partial pass repeats nothing
    assert take_tokens(lengths, 0, rng).size == 0 and take_tokens(np.array([], int), 5, rng).size == 0


def test_budgets_default_is_the_largest_mix_without_repeats():
    b = source_budgets([1000, 600, 100], [0.5, 0.3, 0.2], None)
    np.testing.assert_allclose(b, [250, 150, 100])  # the third source is the limit: 100 / 0.2 = 500 tokens
    np.testing.assert_allclose(source_budgets([10, 10], [3, 1], 4000), [3000, 1000])
    with pytest.raises(ValueError, match="data.mix_tokens=0"):
        source_budgets([10], [1], 0)


def realised_shares(sources, weights, mix_tokens, seed=0):
    rng = np.random.default_rng(seed)
    budgets = source_budgets([int(s.sum()) for s in sources], weights, mix_tokens)
    taken = [s[select_source(s, b, None, rng)].sum() for s, b in zip(sources, budgets)]
    return np.array(taken) / sum(taken), sum(taken)


@pytest.mark.parametrize("mix_tokens", [pytest.param(None, id="no-repeat"), pytest.param(40_000_000, id="repeats")])
def test_weights_hold_in_tokens_within_one_percent(mix_tokens):
    rng = np.random.default_rng(1)
    # books: long; web: many short; code: in between. A mix set in documents would be far off. (The error is at
    # most half a document per source: budgets must be large against the documents for 1%.)
    sources = [rng.integers(5_000, 20_000, size=300), rng.integers(50, 800, size=20_000),
               rng.integers(200, 3000, size=4000)]
    weights = [0.2, 0.5, 0.3]
    shares, total = realised_shares(sources, weights, mix_tokens)
    np.testing.assert_allclose(shares, weights, rtol=0.01)
    if mix_tokens is not None:
        assert abs(total - mix_tokens) / mix_tokens < 0.01


def test_length_upsampling_reaches_the_target_and_keeps_the_source_budget():
    rng = np.random.default_rng(2)
    lengths = np.concatenate([rng.integers(10, 1000, size=3000), rng.integers(5000, 20000, size=20)])
    before = long_share(lengths, 4096)
    assert before < 0.2
    up = LengthUpsample(min_tokens=4096, share=0.5)
    budget = float(lengths.sum())
    picked = select_source(lengths, budget, up, np.random.default_rng(0))
    got = lengths[picked]
    assert abs(got.sum() - budget) / budget < 0.01  # the source's token budget is unchanged
    assert abs(long_share(got, 4096) - 0.5) < 0.01
    counts = np.bincount(picked, minlength=len(lengths))
    assert counts[lengths > 4096].min() >= 2  # long documents repeated ...
    assert counts[lengths <= 4096].max() <= 1  # ... short ones subsampled, never repeated


def test_upsampling_without_long_documents_is_refused():
    with pytest.raises(ValueError, match=r"data.sources\[0\].length_upsample: min_tokens=100 leaves no document"):
        select_source(np.array([5, 10, 50]), 60, LengthUpsample(100, 0.3), np.random.default_rng(0),
                      "data.sources[0].length_upsample")
