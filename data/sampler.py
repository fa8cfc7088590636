"""A deterministic, resumable, infinite sampler for data-parallel ranks, and the DataLoader around it.

Epoch e orders the dataset by a permutation drawn from (seed, e) (or keeps it in order when
`shuffle=False`), drops the last `num_samples % dp_size` indices so every rank gets the same count, and
gives rank r the indices at positions r, r + dp_size, r + 2 dp_size, ... Epochs follow each other
forever. The ranks of one epoch are disjoint and together cover all kept indices.

Resuming counts samples, not optimizer steps: the state is the number of samples this rank has been
handed (micro-batches x micro_batch_size, whatever the gradient accumulation), and a sampler loaded with
it continues with exactly the next sample.

    ds, tok = build_data(seq_len=4096)
    loader = build_dataloader(ds, micro_batch_size=2, seed=0, dp_rank=rank, dp_size=world)
    for batch in loader: ...                     # batch: see `collate_packed`
    ckpt["sampler"] = loader.sampler.state_dict()
    # later, in a new process:
    loader.sampler.load_state_dict(ckpt["sampler"])
"""

from collections.abc import Iterator

import numpy as np
import torch

from .packing import collate_packed


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Infinite per-rank index stream over `num_samples` items (see the module docstring).

    Args:
      num_samples: dataset length.
      seed: seed of the per-epoch permutations (the same on every rank).
      dp_rank, dp_size: this rank and the number of data-parallel ranks.
      shuffle: permute each epoch (True) or keep the dataset order (False, e.g. for evaluation).
    `consumed_samples` counts the indices handed out so far (by every iterator of this sampler, which
    restart from it). Raises `ValueError` when `dp_rank` is not in [0, dp_size) or the dataset has fewer
    samples than ranks.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < dp_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than the dp_size={dp_size} data-parallel "
                "ranks: use a larger corpus (data.path) or a shorter data.seq_len"
            )
        self.num_samples, self.seed, self.dp_rank, self.dp_size = num_samples, seed, dp_rank, dp_size
        self.shuffle = shuffle
        self.consumed_samples = 0

    @property
    def samples_per_epoch(self) -> int:
        """Indices this rank gets per epoch: `num_samples // dp_size`."""
        return self.num_samples // self.dp_size

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self.consumed_samples // self.samples_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, int64 (samples_per_epoch,)."""
        order = np.arange(self.num_samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return order[: self.samples_per_epoch * self.dp_size][self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[int]:
        while True:
            epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
            for index in self.epoch_indices(epoch)[offset:]:
                self.consumed_samples += 1  # counted before handing it out: it is consumed once seen
                yield int(index)

    def state_dict(self) -> dict:
        """`consumed_samples` (samples this rank has been handed) and the settings it depends on."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "dp_size": self.dp_size,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["consumed_samples"]` samples. Raises `ValueError` when the state was saved
        with a different seed, dp_size, dataset length or shuffle (the order would not be the same)."""
        for key in ("seed", "dp_size", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                now = getattr(self, key)
                raise ValueError(f"sampler state was saved with {key}={state[key]}, now {key}={now}")
        self.consumed_samples = int(state["consumed_samples"])


def build_dataloader(dataset, micro_batch_size: int, *, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                     shuffle: bool = True) -> torch.utils.data.DataLoader:
    """An infinite DataLoader of packed micro-batches (`collate_packed` of `micro_batch_size` samples).

    Its `.sampler` is the `ResumableSampler` to save and load. Loading is in the main process
    (num_workers=0): nothing is prefetched, so the sampler's count is exactly what the loop received.
    (With worker processes it would run ahead by the prefetched batches.) Raises `ValueError` naming
    `train.micro_batch_size` when it is < 1, and the sampler's errors.
    """
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must be >= 1")
    sampler = ResumableSampler(len(dataset), seed=seed, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle)
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler,
                                       collate_fn=collate_packed, num_workers=0)
