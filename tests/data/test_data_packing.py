"""Packing invariants (concat, pad), the shard layout, collate_packed, the cache, errors naming settings."""

import numpy as np
import pytest
import torch

import data.build
import data.packing
from data import PackedDataset, build_data, collate_packed, pack
from data.packing import make_sample, write_packed


def test_concat_by_hand():
    p = pack(np.arange(10, dtype=np.int32), np.array([3, 5, 2]), seq_len=4, packing="concat", pad_id=-1)
    np.testing.assert_array_equal(p.tokens, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]])
    np.testing.assert_array_equal(p.cu_seqlens, [0, 3, 4, 0, 4, 0, 2, 4])
    np.testing.assert_array_equal(p.cu_index, [0, 3, 5, 8])
    np.testing.assert_array_equal(p.num_valid, [4, 4, 2])
    s0 = make_sample(p.tokens[0], p.cu_seqlens[0:3], 4)
    assert s0["labels"].tolist() == [1, 2, -100, -100]
    assert s0["position_ids"].tolist() == [0, 1, 2, 0]
    s2 = make_sample(p.tokens[2], p.cu_seqlens[5:8], 2)
    assert s2["labels"].tolist() == [9, -100, -100, -100]
    assert s2["position_ids"].tolist() == [0, 1, 0, 1]


def test_pad_by_hand():
    p = pack(np.arange(10, dtype=np.int32), np.array([3, 5, 2]), seq_len=4, packing="pad", pad_id=-1)
    np.testing.assert_array_equal(p.tokens, [[0, 1, 2, -1], [3, 4, 5, 6], [8, 9, -1, -1]])
    np.testing.assert_array_equal(p.cu_seqlens, [0, 3, 4, 0, 4, 0, 2, 4])
    np.testing.assert_array_equal(p.num_valid, [3, 4, 2])
    s1 = make_sample(p.tokens[1], p.cu_seqlens[3:5], 4)
    assert s1["labels"].tolist() == [4, 5, 6, -100]  # truncated: 7 is dropped, so 6 has no target


@pytest.mark.parametrize("seq_len", [pytest.param(n, id=f"L{n}") for n in (2, 7, 64, 1000, 100_000)])
@pytest.mark.parametrize("split", ["train", "val"])
def test_concat_invariants(build_tiny, tiny_corpus, document_tokens, check_concat_invariants, seq_len, split):
    ds, tok = build_tiny(seq_len=seq_len, split=split)
    assert ds.packing == "concat" and ds.seq_len == seq_len
    check_concat_invariants(ds, document_tokens(tiny_corpus, tok, split))


@pytest.mark.parametrize("seq_len", [pytest.param(n, id=f"L{n}") for n in (2, 33, 5000)])
def test_pad_invariants(build_tiny, tiny_corpus, document_tokens, seq_len):
    ds, tok = build_tiny(seq_len=seq_len, packing="pad")
    docs = document_tokens(tiny_corpus, tok, "train")
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        s = ds[i]
        n = min(len(doc), seq_len)
        ids = s["input_ids"].tolist()
        assert ids[:n] == doc[:n] and ids[n:] == [tok.pad_id] * (seq_len - n)
        assert s["cu_seqlens"].tolist() == ([0, n, seq_len] if n < seq_len else [0, seq_len])
        assert s["labels"].tolist() == doc[1:n] + [-100] * (seq_len - n + 1)
        assert s["position_ids"].tolist() == list(range(n)) + list(range(seq_len - n))


def test_collate_packed_offsets(build_tiny):
    ds, _ = build_tiny(seq_len=64)
    samples = [ds[i] for i in (3, 0, 5)]
    batch = collate_packed(samples)
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (1, 3 * 64) and batch[key].dtype == torch.int64
        assert batch[key][0].tolist() == sum((s[key].tolist() for s in samples), [])
    expected_cu = [0]
    for k, s in enumerate(samples):
        expected_cu += [64 * k + int(c) for c in s["cu_seqlens"][1:]]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == expected_cu
    assert batch["max_seqlen"] == max(b - a for a, b in zip(expected_cu, expected_cu[1:]))
    assert isinstance(batch["max_seqlen"], int)
    with pytest.raises(ValueError, match="at least one sample"):
        collate_packed([])


def test_shards_read_back_identically(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    doc_lens = rng.integers(1, 40, size=50)
    tokens = rng.integers(0, 1000, size=int(doc_lens.sum())).astype(np.int32)
    packed = pack(tokens, doc_lens, seq_len=16, packing="concat", pad_id=0)
    monkeypatch.setattr(data.packing, "SHARD_TOKENS", 16 * 7)  # 7 samples per shard
    write_packed(tmp_path, packed, {"packing": "concat", "pad_id": 0})
    ds = PackedDataset(tmp_path)
    assert len(ds.meta["shard_rows"]) == -(-len(packed.tokens) // 7) > 1
    assert len(ds) == len(packed.tokens)
    for i in range(len(ds)):
        cu = packed.cu_seqlens[packed.cu_index[i] : packed.cu_index[i + 1]]
        expected = make_sample(packed.tokens[i], cu, int(packed.num_valid[i]))
        got = ds[i]
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_pickles_without_its_memory_maps(build_tiny):
    import pickle

    ds, _ = build_tiny(seq_len=64)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None
    assert torch.equal(clone[1]["input_ids"], ds[1]["input_ids"])


def test_new_seq_len_reuses_the_token_stream(tiny_corpus, tmp_path, monkeypatch):
    build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)

    def fail(*args):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(data.build, "tokenize_documents", fail)
    ds, _ = build_data(tiny_corpus, vocab_size=1024, seq_len=24, packing="pad", cache_dir=tmp_path)
    assert ds.seq_len == 24
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    assert len(list((tmp_path / "packed").iterdir())) == 2


def test_interrupted_tokenization_leaves_no_entry(tiny_corpus, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.build, "save_token_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []
    monkeypatch.undo()
    ds, _ = build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)
    assert len(ds) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"seq_len": 1}, "data.seq_len=1", id="seq_len-1"),
        pytest.param({"seq_len": 0}, "data.seq_len=0", id="seq_len-0"),
        pytest.param({"seq_len": 8.5}, "data.seq_len=8.5", id="seq_len-float"),
        pytest.param({"seq_len": 8, "packing": "greedy"}, "data.packing='greedy'", id="packing"),
        pytest.param({"seq_len": 8, "split": "test"}, "split='test'", id="split"),
    ],
)
def test_bad_settings_are_named(tiny_corpus, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_data(tiny_corpus, cache_dir=tmp_path, **kwargs)
