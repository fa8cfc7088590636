"""Packing layouts (concat, pad, best_fit): no token lost or duplicated, exact boundaries, best-fit-decreasing
against a plain reference, streamed shards equal to the in-memory packing."""

import numpy as np
import pytest
import torch

import data.layout
from data import PackedDataset, pack
from data.layout import boundaries, gather_rows, layout_best_fit, make_layout, write_layout
from data.packing import make_sample


def reference_best_fit(doc_lens, seq_len):
    """Best-fit-decreasing written plainly: rows as lists of (doc, piece length), O(pieces x rows)."""
    pieces = []
    for d, n in enumerate(doc_lens):
        pieces += [(d, seq_len)] * (n // seq_len) + ([(d, n % seq_len)] if n % seq_len else [])
    pieces.sort(key=lambda p: -p[1])  # stable: ties keep document order
    rows, room = [], []
    for d, n in pieces:
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))  # least room, then the earliest row
        else:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append((d, n))
        room[r] -= n
    return rows


def test_best_fit_by_hand():
    # pieces 8 (doc 2), 5, 4, 3, 2, 1 (doc 2's remainder) into rows of 8
    lay = layout_best_fit(np.array([5, 3, 9, 2, 4]), seq_len=8)
    starts = [0, 5, 8, 17, 19]  # document starts in the stream
    assert lay.row_ptr.tolist() == [0, 1, 3, 6]
    assert lay.piece_len.tolist() == [8, 5, 3, 4, 2, 1]
    assert lay.piece_start.tolist() == [starts[2], starts[0], starts[1], starts[4], starts[3], starts[2] + 8]
    cu, cu_index, num_valid = boundaries(lay, 8)
    assert cu.tolist() == [0, 8, 0, 5, 8, 0, 4, 6, 7, 8] and cu_index.tolist() == [0, 2, 5, 10]
    assert num_valid.tolist() == [8, 8, 7]


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_matches_reference(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(4, 40))
    doc_lens = rng.integers(1, 3 * seq_len, size=int(rng.integers(1, 60)))
    lay = layout_best_fit(doc_lens, seq_len)
    doc_starts = np.cumsum(doc_lens) - doc_lens
    owner = np.searchsorted(doc_starts, lay.piece_start, side="right") - 1
    got = [[(int(owner[p]), int(lay.piece_len[p])) for p in range(lay.row_ptr[r], lay.row_ptr[r + 1])]
           for r in range(lay.num_rows)]
    assert got == reference_best_fit(doc_lens.tolist(), seq_len)


@pytest.mark.parametrize("packing", ["concat", "pad", "best_fit"])
@pytest.mark.parametrize("seq_len", [pytest.param(n, id=f"L{n}") for n in (2, 7, 64, 1000)])
def test_no_token_lost_or_duplicated_and_exact_boundaries(packing, seq_len):
    rng = np.random.default_rng(seq_len)
    doc_lens = np.concatenate([rng.integers(1, 50, size=40), [1, 3 * seq_len + 1, seq_len, seq_len + 1]])
    n = int(doc_lens.sum())
    stream = np.arange(n, dtype=np.int32) + 10  # token value = position + 10: each token is unique
    doc_ends = set(np.cumsum(doc_lens).tolist())
    lay = make_layout(doc_lens, seq_len, packing)
    rows = gather_rows(stream, lay, 0, lay.num_rows, seq_len, pad_id=-1)
    cu, cu_index, num_valid = boundaries(lay, seq_len)
    valid = np.concatenate([row[:v] for row, v in zip(rows, num_valid)])
    assert (np.concatenate([row[v:] for row, v in zip(rows, num_valid)]) == -1).all()
    truncated = n - len(valid)
    expected_truncated = int(np.maximum(doc_lens - seq_len, 0).sum()) if packing == "pad" else 0
    assert truncated == lay.tokens_truncated == expected_truncated
    assert len(set(valid.tolist())) == len(valid)  # nothing duplicated
    if packing != "pad":
        assert sorted(valid.tolist()) == stream.tolist()  # nothing lost
    for r in range(lay.num_rows):
        c = cu[cu_index[r] : cu_index[r + 1]]
        assert c[0] == 0 and c[-1] == seq_len and (np.diff(c) > 0).all()
        sample = make_sample(rows[r], c, int(num_valid[r]))
        pos = sample["position_ids"].numpy()
        for a, b in zip(c[:-1], c[1:]):
            seg = rows[r][a:b]
            assert pos[a:b].tolist() == list(range(b - a))
            if b <= num_valid[r]:  # a real segment: consecutive stream tokens inside one document
                assert (np.diff(seg) == 1).all()
                first, last = int(seg[0]) - 10, int(seg[-1]) - 10
                assert not any(first < e <= last for e in doc_ends)  # never crosses a document end
                assert (sample["labels"].numpy()[a : b - 1] == seg[1:]).all() and sample["labels"][b - 1] == -100
    if packing == "best_fit":  # only documents longer than seq_len are split
        starts = set(lay.piece_start.tolist())
        for s, length in zip(np.cumsum(doc_lens) - doc_lens, doc_lens):
            assert int(s) in starts
            assert sum(1 for p in starts if s <= p < s + length) == -(-int(length) // seq_len)


def test_best_fit_fill_at_least_pad():
    rng = np.random.default_rng(0)
    doc_lens = rng.integers(1, 300, size=500)
    fills = {}
    for packing in ("concat", "pad", "best_fit"):
        lay = make_layout(doc_lens, 256, packing)
        fills[packing] = lay.piece_len.sum() / (lay.num_rows * 256)
    assert fills["best_fit"] >= fills["pad"]
    assert fills["best_fit"] > 0.95  # many small pieces fill the gaps
    assert fills["concat"] == doc_lens.sum() / (-(-doc_lens.sum() // 256) * 256)


def test_pack_best_fit_in_memory_equals_layout():
    rng = np.random.default_rng(1)
    doc_lens = rng.integers(1, 40, size=30)
    tokens = rng.integers(0, 500, size=int(doc_lens.sum())).astype(np.int32)
    p = pack(tokens, doc_lens, seq_len=16, packing="best_fit", pad_id=0)
    lay = layout_best_fit(doc_lens, 16)
    np.testing.assert_array_equal(p.tokens, gather_rows(tokens, lay, 0, lay.num_rows, 16, 0))
    assert p.num_valid.sum() == doc_lens.sum()


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_streamed_shards_equal_in_memory(tmp_path, monkeypatch, packing):
    rng = np.random.default_rng(2)
    doc_lens = rng.integers(1, 50, size=80)
    tokens = rng.integers(0, 1000, size=int(doc_lens.sum())).astype(np.int32)
    np.save(tmp_path / "stream.npy", tokens)
    stream = np.load(tmp_path / "stream.npy", mmap_mode="r")
    monkeypatch.setattr(data.layout, "WRITE_CHUNK_TOKENS", 16 * 3)  # 3 rows per gather
    lay = make_layout(doc_lens, 16, packing)
    out = tmp_path / "packed"
    out.mkdir()
    shard_rows = write_layout(out, stream, lay, 16, pad_id=0, shard_tokens=16 * 7)
    assert shard_rows == [7] * (lay.num_rows // 7) + ([lay.num_rows % 7] if lay.num_rows % 7 else [])
    import json

    (out / "meta.json").write_text(json.dumps({"seq_len": 16, "packing": packing, "pad_id": 0,
                                               "num_samples": lay.num_rows, "shard_rows": shard_rows}))
    ds = PackedDataset(out)
    expected = pack(tokens, doc_lens, 16, packing, 0)
    for i in range(len(ds)):
        cu = expected.cu_seqlens[expected.cu_index[i] : expected.cu_index[i + 1]]
        want = make_sample(expected.tokens[i], cu, int(expected.num_valid[i]))
        assert all(torch.equal(ds[i][k], want[k]) for k in want)
