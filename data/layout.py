"""Where each document's tokens go in the packed samples: a `Layout` of pieces per row, for the three
packing modes, and a writer that fills the shards from a memory-mapped token stream one chunk at a time.

A piece is a run of consecutive tokens of the stream (a document, or part of one) placed at the next free
position of a row; a row of `seq_len` (L) tokens is its pieces in order, then padding when they fill less
than L. Each piece is its own segment (attention, positions and labels never cross it), so a row's
`cu_seqlens` is 0, the running sums of its piece lengths, then L when the row is padded.

- concat: the stream cut at document ends and at every multiple of L (rows are consecutive slices).
- pad: one piece per document, its first min(length, L) tokens; the rest is truncated.
- best_fit: documents longer than L are split into pieces of L tokens and a remainder (the only split);
  then pieces go into rows best-fit-decreasing: longest first (ties in document order), each into the
  open row with the least room that still fits it (ties: the earliest row), a new row when none does.
  No token is dropped. A row's pieces keep the order they were placed in; rows are numbered in the
  order they were opened (longest pieces first).

Shapes: P pieces, R rows. `piece_start`, `piece_len` int64 (P,), `row_ptr` int64 (R + 1,) (row r holds
pieces row_ptr[r]:row_ptr[r + 1]).
"""

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

WRITE_CHUNK_TOKENS = 1 << 22  # tokens gathered per write step (bounds the index arrays' memory)


@dataclass
class Layout:
    """Pieces of the token stream per row (module docstring). `tokens_truncated`: stream tokens left out."""

    piece_start: np.ndarray  # int64 (P,)
    piece_len: np.ndarray  # int64 (P,)
    row_ptr: np.ndarray  # int64 (R + 1,)
    tokens_truncated: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def layout_concat(doc_lens: np.ndarray, seq_len: int) -> Layout:
    """Documents end to end, cut at document ends and every `seq_len` tokens. `doc_lens` int (D,), sum N >= 1."""
    n = int(np.sum(doc_lens))
    rows = -(-n // seq_len)
    points = np.union1d(np.concatenate([[0], np.cumsum(doc_lens)]), np.arange(rows, dtype=np.int64) * seq_len)
    points = points[points <= n]
    starts, lens = points[:-1], np.diff(points)
    row_ptr = np.searchsorted(starts, np.arange(rows + 1, dtype=np.int64) * seq_len, side="left")
    return Layout(starts.astype(np.int64), lens.astype(np.int64), row_ptr.astype(np.int64))


def layout_pad(doc_lens: np.ndarray, seq_len: int) -> Layout:
    """One row per document, its first `seq_len` tokens (the rest counted in `tokens_truncated`)."""
    doc_lens = np.asarray(doc_lens, dtype=np.int64)
    kept = np.minimum(doc_lens, seq_len)
    starts = np.cumsum(doc_lens) - doc_lens
    return Layout(starts, kept, np.arange(len(doc_lens) + 1, dtype=np.int64), int((doc_lens - kept).sum()))


class _FirstFit:
    """Counts of open rows per remaining room 0..L in a segment tree: `first_at_least(x)` is the smallest
    room >= x that some open row has (-1 when none), in O(log L)."""

    def __init__(self, seq_len: int):
        self.size = 1 << max(1, int(seq_len).bit_length())
        self.tree = [0] * (2 * self.size)

    def add(self, room: int, delta: int) -> None:
        i = room + self.size
        while i:
            self.tree[i] += delta
            i >>= 1

    def first_at_least(self, x: int) -> int:
        tree, i = self.tree, x + self.size
        while tree[i] == 0:
            while i & 1:  # a right child: climb until a right sibling exists
                i >>= 1
            if i == 0:
                return -1
            i += 1
        while i < self.size:
            i = 2 * i if tree[2 * i] else 2 * i + 1
        return i - self.size


def layout_best_fit(doc_lens: np.ndarray, seq_len: int) -> Layout:
    """Best-fit-decreasing packing (module docstring); documents longer than `seq_len` are split into
    `seq_len`-token pieces and a remainder. `doc_lens` int (D,) >= 1. Deterministic (stable sort)."""
    doc_lens = np.asarray(doc_lens, dtype=np.int64)
    doc_starts = np.cumsum(doc_lens) - doc_lens
    full = doc_lens // seq_len
    rem = doc_lens % seq_len
    # pieces: every document's full chunks, then its remainder (when non-zero)
    n_pieces = full + (rem > 0)
    owner = np.repeat(np.arange(len(doc_lens)), n_pieces)
    k = np.arange(int(n_pieces.sum())) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    piece_start = doc_starts[owner] + k * seq_len
    piece_len = np.where(k < full[owner], seq_len, rem[owner]).astype(np.int64)

    order = np.argsort(-piece_len, kind="stable")
    fit = _FirstFit(seq_len)
    rows_at: dict[int, list[int]] = {}  # room -> open rows with that room (a heap: the earliest row first)
    row_of = np.empty(len(order), dtype=np.int64)
    num_rows = 0
    for p, length in zip(order.tolist(), piece_len[order].tolist()):
        room = fit.first_at_least(length)
        if room < 0:
            row, left = num_rows, seq_len - length
            num_rows += 1
        else:
            row, left = heapq.heappop(rows_at[room]), room - length
            fit.add(room, -1)
        row_of[p] = row
        if left > 0:
            heapq.heappush(rows_at.setdefault(left, []), row)
            fit.add(left, 1)
    # rows in the order they were opened; within a row, pieces in placement order
    placed = order[np.argsort(row_of[order], kind="stable")]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=num_rows))]).astype(np.int64)
    return Layout(piece_start[placed].astype(np.int64), piece_len[placed], row_ptr)


LAYOUTS = {"concat": layout_concat, "pad": layout_pad, "best_fit": layout_best_fit}


def make_layout(doc_lens: np.ndarray, seq_len: int, packing: str) -> Layout:
    """The `Layout` of packing mode `packing` ("concat", "pad" or "best_fit") for documents `doc_lens`."""
    return LAYOUTS[packing](doc_lens, seq_len)


def boundaries(layout: Layout, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's `cu_seqlens`, concatenated (int32), `cu_index` (int64 (R + 1,): row r's cu_seqlens are
    cu_seqlens[cu_index[r]:cu_index[r + 1]]) and `num_valid` (int32 (R,), tokens before the padding)."""
    counts = np.diff(layout.row_ptr)
    row_of_piece = np.repeat(np.arange(layout.num_rows), counts)
    csum = np.cumsum(layout.piece_len)
    row_base = np.concatenate([[0], csum])[layout.row_ptr[:-1]]
    ends = csum - row_base[row_of_piece]  # each piece's end within its row
    num_valid = np.zeros(layout.num_rows, dtype=np.int64)
    np.add.at(num_valid, row_of_piece, layout.piece_len)
    padded = num_valid < seq_len
    per_row = 1 + counts + padded
    cu_index = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    cu = np.zeros(int(cu_index[-1]), dtype=np.int64)
    within = np.arange(len(ends)) - np.repeat(layout.row_ptr[:-1], counts)
    cu[np.repeat(cu_index[:-1], counts) + 1 + within] = ends
    cu[cu_index[1:][padded] - 1] = seq_len
    return cu.astype(np.int32), cu_index, num_valid.astype(np.int32)


def gather_rows(stream: np.ndarray, layout: Layout, r0: int, r1: int, seq_len: int, pad_id: int) -> np.ndarray:
    """Rows r0..r1-1 of the packed samples as int32 (r1 - r0, seq_len), read from `stream` (int (N,), may
    be a memory map: only the tokens of these rows are read)."""
    p0, p1 = int(layout.row_ptr[r0]), int(layout.row_ptr[r1])
    starts, lens = layout.piece_start[p0:p1], layout.piece_len[p0:p1]
    counts = np.diff(layout.row_ptr[r0 : r1 + 1])
    row_of = np.repeat(np.arange(r1 - r0), counts)
    first = np.cumsum(lens) - lens  # piece offsets within the chunk's pieces
    offset_in_row = first - np.concatenate([[0], np.cumsum(lens)])[layout.row_ptr[r0:r1] - p0][row_of]
    within = np.arange(int(lens.sum())) - np.repeat(first, lens)
    dest = np.repeat(row_of * seq_len + offset_in_row, lens) + within
    out = np.full((r1 - r0) * seq_len, pad_id, dtype=np.int32)
    out[dest] = stream[np.repeat(starts, lens) + within]
    return out.reshape(r1 - r0, seq_len)


def write_layout(directory: Path, stream: np.ndarray, layout: Layout, seq_len: int, pad_id: int,
                 shard_tokens: int, desc: str = "packing") -> list[int]:
    """Write the rows of `layout` as `tokens-00000.npy`... (int32 (rows, seq_len) each, at most
    `shard_tokens` tokens) plus `cu_seqlens.npy`, `cu_index.npy`, `num_valid.npy` into `directory` (the
    layout of `data.packing`), gathering at most `WRITE_CHUNK_TOKENS` tokens at a time from `stream`.
    Returns the rows per shard."""
    rows_per_shard = max(1, shard_tokens // seq_len)
    chunk_rows = max(1, WRITE_CHUNK_TOKENS // seq_len)
    shard_rows = []
    with tqdm(total=layout.num_rows, desc=desc, unit="row", disable=None) as bar:
        for i, s0 in enumerate(range(0, layout.num_rows, rows_per_shard)):
            s1 = min(s0 + rows_per_shard, layout.num_rows)
            out = np.lib.format.open_memmap(directory / f"tokens-{i:05d}.npy", mode="w+", dtype=np.int32,
                                            shape=(s1 - s0, seq_len))
            for r0 in range(s0, s1, chunk_rows):
                r1 = min(r0 + chunk_rows, s1)
                out[r0 - s0 : r1 - s0] = gather_rows(stream, layout, r0, r1, seq_len, pad_id)
                bar.update(r1 - r0)
            out.flush()
            del out
            shard_rows.append(s1 - s0)
    cu, cu_index, num_valid = boundaries(layout, seq_len)
    np.save(directory / "cu_seqlens.npy", cu)
    np.save(directory / "cu_index.npy", cu_index)
    np.save(directory / "num_valid.npy", num_valid)
    return shard_rows
