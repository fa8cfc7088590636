"""Which documents (and how many copies) make the training mixture: weights held in tokens, long documents
up-weighted within a source without changing the source mix.

Given each source's documents and their token counts (after tokenization, BOS/EOS included):

1. Budgets. With weights w_s normalised to sum 1 and T_s the source's tokens, the mixture has
   `total` tokens (`data.mix_tokens`; default min_s T_s / w_s, the largest mix in which no source repeats)
   and source s gets B_s = w_s * total tokens. A source is repeated (B_s > T_s) or subsampled (B_s < T_s)
   as needed: weights are realised in tokens, not in documents, so a few long books cannot tilt the mix.
2. Length upsampling (per source, `length_upsample: {min_tokens, share}`): the source's documents longer
   than `min_tokens` form the long pool, the others the short pool; the long pool gets `share * B_s`
   tokens and the short pool the rest, so the source's total B_s (and the mix across sources) stays as
   set while long documents are repeated (Fu et al. 2024, "Data Engineering for Scaling Language Models to
   128K Context", Sec. 3: per-source length upsampling).
3. Drawing B tokens from a pool of documents with T tokens: floor(B / T) full copies of the pool, then the
   shortest prefix of a seeded random order of the pool whose tokens reach the remainder (the last
   document is left out when that lands closer). The error is at most half of one document per pool.

All functions are pure numpy and deterministic for a seed.
"""

import numpy as np


def take_tokens(lengths: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into `lengths` (int (D,), tokens per document, all >= 1) whose lengths sum to about `budget`
    tokens: full copies of every index, then a random prefix (step 3 of the module docstring).

    Returns int64 (K,) indices, repeats allowed, grouped by copy. An empty pool or a budget <= 0 gives none.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    copies, rest = divmod(float(budget), total)
    parts = [np.arange(len(lengths), dtype=np.int64)] * int(copies)
    order = rng.permutation(len(lengths))
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, rest, side="left"))  # the first prefix reaching rest ends at index k
    if k < len(order):
        below = cum[k - 1] if k > 0 else 0
        k += int(cum[k] - rest <= rest - below)  # include document k when that lands closer
    parts.append(order[:k].astype(np.int64))
    return np.concatenate(parts)


def source_budgets(totals: list[int], weights: list[float], mix_tokens: int | None) -> np.ndarray:
    """Tokens each source contributes (float64 (S,)): `w_s / sum(w) * total` with `total = mix_tokens`, or
    when that is None the largest total in which no source repeats (`min_s T_s / w_s`).

    Raises `ValueError` naming `data.mix_tokens` when it is set and < 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if mix_tokens is None:
        total = float(np.min(np.asarray(totals, dtype=np.float64) / w))
    else:
        if isinstance(mix_tokens, bool) or not isinstance(mix_tokens, int) or mix_tokens < 1:
            raise ValueError(f"data.mix_tokens={mix_tokens!r} must be an integer >= 1 (tokens) or null")
        total = float(mix_tokens)
    return w * total


def select_source(lengths: np.ndarray, budget: float, upsample, rng: np.random.Generator,
                  setting: str = "data.length_upsample") -> np.ndarray:
    """Indices (int64, repeats allowed) of one source's documents making about `budget` tokens; with
    `upsample` (`data.sources.LengthUpsample` or None) a fraction `upsample.share` of them comes from the
    documents longer than `upsample.min_tokens` tokens (step 2 of the module docstring).

    Raises `ValueError` naming `setting` when upsampling asks for long documents and the source has none
    (or asks for short ones and all are long).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if upsample is None:
        return take_tokens(lengths, budget, rng)
    long_idx = np.flatnonzero(lengths > upsample.min_tokens)
    short_idx = np.flatnonzero(lengths <= upsample.min_tokens)
    if len(long_idx) == 0 or len(short_idx) == 0:
        which = "longer" if len(long_idx) == 0 else "of at most"
        raise ValueError(f"{setting}: min_tokens={upsample.min_tokens} leaves no document {which} "
                         f"{upsample.min_tokens} tokens in this source (documents have {lengths.min()} to "
                         f"{lengths.max()} tokens): choose another min_tokens or drop length_upsample")
    picked_long = long_idx[take_tokens(lengths[long_idx], upsample.share * budget, rng)]
    picked_short = short_idx[take_tokens(lengths[short_idx], (1 - upsample.share) * budget, rng)]
    return np.concatenate([picked_long, picked_short])


def long_share(lengths: np.ndarray, min_tokens: int) -> float:
    """Fraction of the tokens in `lengths` (int (D,)) that belong to documents longer than `min_tokens`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = lengths.sum()
    return float(lengths[lengths > min_tokens].sum() / total) if total else 0.0
