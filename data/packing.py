"""Tokenize documents once, pack them into fixed-length samples that keep document boundaries.

Token stream: every document is encoded and followed by EOS; the split's documents laid end to end
give one int32 stream of N tokens (`tokens.npy`) plus each document's length (`doc_lens.npy`, int64).

Packing (`data.packing`) cuts the stream into samples of exactly `seq_len` (L) tokens, each split into
segments: a segment is a (piece of a) document, and attention, positions and labels never cross one.
- "concat": documents end to end; a document crossing a sample boundary is cut and its continuation is
  a new segment at the start of the next sample. No token is dropped: the last sample is filled up with
  a padding segment.
- "pad": one document per sample, truncated to L tokens (the rest of a longer document, EOS included, is
  dropped); the remaining positions form a trailing padding segment.
- "best_fit": documents placed into samples best-fit-decreasing, split only when longer than L; the rest
  of a sample is a padding segment. No token is dropped (see `data.layout`).
Padding tokens hold `pad_id`, have labels -100 and positions restarting at 0.

On disk (one directory per packed split, see `write_packed`):
  tokens-00000.npy ...  int32 (rows, L) shards of at most `SHARD_TOKENS` tokens, memory-mapped on read
  cu_seqlens.npy        int32, every sample's cu_seqlens (0, segment ends..., L) concatenated
  cu_index.npy          int64 (S + 1,), sample i's cu_seqlens = cu_seqlens[cu_index[i]:cu_index[i + 1]]
  num_valid.npy         int32 (S,), tokens of sample i before its padding (L when it has none)
  meta.json             seq_len, packing, pad_id, shard rows, counts (num_docs, num_tokens of the
                        stream, num_packed_tokens before padding, num_samples, num_segments)

Sample dict (one packed row; L = seq_len, n = number of segments of the sample):
  input_ids     int64 (L,)
  labels        int64 (L,)  the next token within the segment; -100 at each segment's last token and
                            on padding. Shifted here, on the whole sample, so that sequence-parallel
                            sharding later must not shift again.
  position_ids  int64 (L,)  0, 1, ... restarting at every segment start
  cu_seqlens    int32 (n + 1,) segment boundaries: 0 first, L last, strictly increasing
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .layout import boundaries, gather_rows, layout_best_fit
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PACKING_MODES = ("concat", "pad", "best_fit")
IGNORE_INDEX = -100
SHARD_TOKENS = 1 << 27  # tokens per shard file (512 MiB of int32)
ENCODE_BATCH = 256  # documents per tokenizer call


# ---------------------------------------------------------------------------------------------------
# Token stream


def tokenize_documents(texts: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Encode each text and append EOS, showing a progress bar (on a terminal).

    Returns `(tokens, doc_lens)`: int32 (N,) the documents' ids end to end, int64 (D,) their lengths
    (EOS included, so every length is >= 1).
    """
    pieces, lens = [], []
    with tqdm(total=len(texts), desc="tokenizing", unit="doc", disable=None) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            for ids in tokenizer.encode_batch(texts[start : start + ENCODE_BATCH]):
                pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
                lens.append(len(ids) + 1)
            bar.update(min(ENCODE_BATCH, len(texts) - start))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return tokens, np.asarray(lens, dtype=np.int64)


def save_token_stream(directory: Path, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
    """Write `tokens.npy` and `doc_lens.npy` into `directory` (an `atomic_directory`)."""
    np.save(directory / "tokens.npy", tokens)
    np.save(directory / "doc_lens.npy", doc_lens)


def load_token_stream(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `(tokens, doc_lens)` saved by `save_token_stream`, tokens memory-mapped (read only)."""
    return np.load(directory / "tokens.npy", mmap_mode="r"), np.load(directory / "doc_lens.npy")


# ---------------------------------------------------------------------------------------------------
# Packing


@dataclass
class Packed:
    """Packed samples in memory. S samples of L tokens."""

    tokens: np.ndarray  # int32 (S, L)
    cu_seqlens: np.ndarray  # int32, the samples' cu_seqlens concatenated
    cu_index: np.ndarray  # int64 (S + 1,)
    num_valid: np.ndarray  # int32 (S,)


def check_packing_args(seq_len: int, packing: str) -> None:
    """Raise `ValueError` naming `data.seq_len` / `data.packing` when they are not usable."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be an integer >= 2 (tokens per sample)")
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing={packing!r} must be one of {PACKING_MODES}")


def _gather_runs(values: np.ndarray, lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values[lo[0]:lo[0]+counts[0]], values[lo[1]:...], ... concatenated, without a Python loop."""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return values[np.repeat(lo, counts) + within]


def pack_concat(tokens: np.ndarray, doc_lens: np.ndarray, seq_len: int, pad_id: int) -> Packed:
    """Lay the documents end to end and cut every `seq_len` tokens; the last sample is padded.

    `tokens` int32 (N,), `doc_lens` int64 (D,) summing to N >= 1. Segment boundaries are the document
    ends and the sample cuts (and N, where the final padding segment starts).
    """
    n, length = len(tokens), seq_len
    num_samples = -(-n // length)
    starts = np.arange(num_samples, dtype=np.int64) * length
    points = np.union1d(np.cumsum(doc_lens), np.arange(num_samples + 1, dtype=np.int64) * length)
    lo = np.searchsorted(points, starts, side="left")
    counts = np.searchsorted(points, starts + length, side="right") - lo
    cu_seqlens = (_gather_runs(points, lo, counts) - np.repeat(starts, counts)).astype(np.int32)
    flat = np.full(num_samples * length, pad_id, dtype=np.int32)
    flat[:n] = tokens
    return Packed(
        tokens=flat.reshape(num_samples, length),
        cu_seqlens=cu_seqlens,
        cu_index=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        num_valid=np.minimum(length, n - starts).astype(np.int32),
    )


def pack_pad(tokens: np.ndarray, doc_lens: np.ndarray, seq_len: int, pad_id: int) -> Packed:
    """One document per sample, truncated to `seq_len`, followed by a padding segment when shorter.

    `tokens` int32 (N,), `doc_lens` int64 (D,) summing to N. Gives D samples.
    """
    kept = np.minimum(doc_lens, seq_len)
    doc_starts = np.cumsum(doc_lens) - doc_lens
    out = np.full((len(doc_lens), seq_len), pad_id, dtype=np.int32)
    rows = np.repeat(np.arange(len(doc_lens)), kept)
    cols = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
    out[rows, cols] = tokens[np.repeat(doc_starts, kept) + cols]
    padded = kept < seq_len
    counts = 2 + padded.astype(np.int64)
    cu_index = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cu_seqlens = np.zeros(cu_index[-1], dtype=np.int32)
    cu_seqlens[cu_index[:-1] + 1] = kept
    cu_seqlens[cu_index[:-1][padded] + 2] = seq_len
    return Packed(tokens=out, cu_seqlens=cu_seqlens, cu_index=cu_index, num_valid=kept.astype(np.int32))


def pack_best_fit(tokens: np.ndarray, doc_lens: np.ndarray, seq_len: int, pad_id: int) -> Packed:
    """Best-fit-decreasing packing (`data.layout.layout_best_fit`), in memory. No token is dropped."""
    layout = layout_best_fit(doc_lens, seq_len)
    cu_seqlens, cu_index, num_valid = boundaries(layout, seq_len)
    rows = gather_rows(tokens, layout, 0, layout.num_rows, seq_len, pad_id)
    return Packed(tokens=rows, cu_seqlens=cu_seqlens, cu_index=cu_index, num_valid=num_valid)


def pack(tokens: np.ndarray, doc_lens: np.ndarray, seq_len: int, packing: str, pad_id: int) -> Packed:
    """Pack with mode `packing` ("concat", "pad" or "best_fit"); see `pack_concat`, `pack_pad`, `pack_best_fit`."""
    check_packing_args(seq_len, packing)
    fn = {"concat": pack_concat, "pad": pack_pad, "best_fit": pack_best_fit}[packing]
    return fn(np.asarray(tokens), doc_lens, seq_len, pad_id)


def write_packed(directory: Path, packed: Packed, meta: dict) -> None:
    """Write `packed` into `directory` (an `atomic_directory`) in the layout of the module docstring."""
    num_samples, seq_len = packed.tokens.shape
    rows = max(1, SHARD_TOKENS // seq_len)
    shards = []
    for i, start in enumerate(range(0, num_samples, rows)):
        np.save(directory / f"tokens-{i:05d}.npy", packed.tokens[start : start + rows])
        shards.append(min(rows, num_samples - start))
    np.save(directory / "cu_seqlens.npy", packed.cu_seqlens)
    np.save(directory / "cu_index.npy", packed.cu_index)
    np.save(directory / "num_valid.npy", packed.num_valid)
    meta = dict(meta, seq_len=seq_len, num_samples=num_samples, shard_rows=shards,
                num_segments=int(len(packed.cu_seqlens) - num_samples),
                num_packed_tokens=int(packed.num_valid.sum()))
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------------
# Reading


def make_sample(row: np.ndarray, cu_seqlens: np.ndarray, num_valid: int) -> dict[str, torch.Tensor]:
    """The sample dict (see the module docstring) of one packed row.

    `row` int (L,) token ids, `cu_seqlens` int (n + 1,) its segment boundaries, `num_valid` the number of
    tokens before the padding segment (positions >= it get label -100).
    """
    input_ids = np.asarray(row, dtype=np.int64)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    position_ids = np.arange(len(input_ids)) - np.repeat(cu[:-1], np.diff(cu))
    labels = np.empty_like(input_ids)
    labels[:-1] = input_ids[1:]
    labels[cu[1:] - 1] = IGNORE_INDEX
    labels[num_valid:] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
    }


class PackedDataset(torch.utils.data.Dataset):
    """Packed samples memory-mapped from a directory written by `write_packed`.

    `ds[i]` is the sample dict of the module docstring (int64 (L,) `input_ids`, `labels`,
    `position_ids`; int32 (n + 1,) `cu_seqlens`). Attributes: `seq_len`, `packing`, `pad_id`, `meta`
    (the dict of meta.json: also `num_docs`, `num_tokens`, `split`, ...). Picklable (for DataLoader
    workers): the memory maps are reopened in each process.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.seq_len: int = self.meta["seq_len"]
        self.packing: str = self.meta["packing"]
        self.pad_id: int = self.meta["pad_id"]
        self._shard_starts = np.concatenate([[0], np.cumsum(self.meta["shard_rows"])])
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            d = self.directory
            num_shards = len(self.meta["shard_rows"])
            shards = [np.load(d / f"tokens-{i:05d}.npy", mmap_mode="r") for i in range(num_shards)]
            self._arrays = (
                shards,
                np.load(d / "cu_seqlens.npy", mmap_mode="r"),
                np.load(d / "cu_index.npy"),
                np.load(d / "num_valid.npy"),
            )
        return self._arrays

    def __getstate__(self):
        return dict(self.__dict__, _arrays=None)

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        shards, cu_seqlens, cu_index, num_valid = self._open()
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        row = shards[shard][index - self._shard_starts[shard]]
        return make_sample(row, cu_seqlens[cu_index[index] : cu_index[index + 1]], int(num_valid[index]))


def collate_packed(samples: list[dict[str, torch.Tensor]]) -> dict:
    """Concatenate a micro-batch of sample dicts into ONE packed row, so attention never crosses documents.

    Returns `input_ids`, `labels`, `position_ids`: int64 (1, T) with T = the samples' lengths summed
    (B * seq_len); `cu_seqlens`: int32 (total segments + 1,), each sample's boundaries shifted by its
    offset, 0 first and T last; `max_seqlen`: int, the longest segment. Raises `ValueError` on an empty list.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    lengths = [len(s["input_ids"]) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    shifted = [s["cu_seqlens"][1:] + int(offset) for s, offset in zip(samples, offsets)]
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), *shifted])
    batch = {k: torch.cat([s[k] for s in samples])[None] for k in ("input_ids", "labels", "position_ids")}
    return dict(batch, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
