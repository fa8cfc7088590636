"""The resumable data-parallel sampler and the DataLoader built on it."""

import itertools

import numpy as np
import pytest
import torch

from data import ResumableSampler, build_dataloader


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("num_samples, dp_size", [pytest.param(11, 2, id="11x2"),
                                                  pytest.param(30, 3, id="30x3")])
def test_ranks_disjoint_and_covering_every_epoch(num_samples, dp_size):
    per_rank = num_samples // dp_size
    ranks = [ResumableSampler(num_samples, seed=5, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    streams = [take(s, 3 * per_rank) for s in ranks]
    for epoch in range(3):
        parts = [set(s[epoch * per_rank : (epoch + 1) * per_rank]) for s in streams]
        assert all(len(p) == per_rank for p in parts)
        assert set().union(*parts) <= set(range(num_samples))
        assert sum(map(len, parts)) == len(set().union(*parts)) == per_rank * dp_size  # disjoint
    orders = [tuple(streams[0][e * per_rank : (e + 1) * per_rank]) for e in range(3)]
    assert len(set(orders)) == 3  # a new permutation each epoch


def test_deterministic_and_seeded():
    assert take(ResumableSampler(50, seed=1), 120) == take(ResumableSampler(50, seed=1), 120)
    assert take(ResumableSampler(50, seed=1), 50) != take(ResumableSampler(50, seed=2), 50)


def test_no_shuffle_keeps_order():
    assert take(ResumableSampler(7, shuffle=False, dp_rank=1, dp_size=2), 6) == [1, 3, 5, 1, 3, 5]


@pytest.mark.parametrize("consumed", [pytest.param(n, id=f"after{n}") for n in (0, 4, 9, 10, 23)])
def test_resume_continues_with_the_next_sample(consumed):
    full = take(ResumableSampler(21, seed=3, dp_rank=1, dp_size=2), 40)
    first = ResumableSampler(21, seed=3, dp_rank=1, dp_size=2)
    assert take(first, consumed) == full[:consumed]
    state = first.state_dict()
    assert state["consumed_samples"] == consumed
    resumed = ResumableSampler(21, seed=3, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert resumed.epoch == consumed // 10
    assert take(resumed, 40 - consumed) == full[consumed:]


def test_state_from_other_settings_is_rejected():
    state = ResumableSampler(20, seed=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_size=2, now dp_size=4"):
        ResumableSampler(20, seed=0, dp_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=20, now num_samples=21"):
        ResumableSampler(21, seed=0, dp_size=2).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"num_samples": 10, "dp_rank": 2, "dp_size": 2}, "dp_rank=2", id="rank"),
        pytest.param({"num_samples": 1, "dp_size": 2}, "fewer than the dp_size=2", id="too-few"),
    ],
)
def test_sampler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResumableSampler(**kwargs)


def test_dataloader_resume_counts_micro_batches(build_tiny):
    ds, _ = build_tiny(seq_len=16)
    loader = build_dataloader(ds, micro_batch_size=3, seed=7, dp_rank=0, dp_size=2)
    uninterrupted = list(itertools.islice(loader, 6))
    assert uninterrupted[0]["input_ids"].shape == (1, 48) and uninterrupted[0]["cu_seqlens"][-1] == 48

    first = build_dataloader(ds, micro_batch_size=3, seed=7, dp_rank=0, dp_size=2)
    for _ in itertools.islice(first, 4):  # 4 micro-batches, e.g. 2 optimizer steps of grad_accum 2
        pass
    state = first.sampler.state_dict()
    assert state["consumed_samples"] == 12
    resumed = build_dataloader(ds, micro_batch_size=3, seed=7, dp_rank=0, dp_size=2)
    resumed.sampler.load_state_dict(state)
    for expected, got in zip(uninterrupted[4:], itertools.islice(resumed, 2)):
        assert all(torch.equal(torch.as_tensor(expected[k]), torch.as_tensor(got[k])) for k in expected)
    with pytest.raises(ValueError, match="train.micro_batch_size=0"):
        build_dataloader(ds, micro_batch_size=0)


def test_epoch_indices_shape():
    s = ResumableSampler(10, dp_rank=0, dp_size=3)
    idx = s.epoch_indices(0)
    assert idx.shape == (3,) and idx.dtype == np.int64
