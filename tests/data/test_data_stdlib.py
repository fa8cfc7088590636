"""The embedded default corpus end to end: first-time prep of the Python stdlib in a fresh cache."""

import time

import pytest

from data import build_data, build_dataloader, load_corpus, split_corpus

BUDGET_S = 60.0


@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("stdlib_cache")
    start = time.perf_counter()
    train, tok = build_data(seq_len=2048, cache_dir=cache)
    val, _ = build_data(seq_len=2048, split="val", cache_dir=cache)
    return train, val, tok, time.perf_counter() - start


def test_first_time_prep_is_fast(stdlib_data):
    train, val, tok, seconds = stdlib_data
    assert seconds < BUDGET_S
    assert train.meta["num_docs"] > 500 and train.meta["num_tokens"] > 1_000_000
    assert 1 <= val.meta["num_docs"] < 0.05 * train.meta["num_docs"]
    assert tok.vocab_size == 8192


def test_val_invariants_and_round_trip(stdlib_data, document_tokens, check_concat_invariants):
    _, val, tok, _ = stdlib_data
    docs = document_tokens(None, tok, "val")
    check_concat_invariants(val, docs)
    text = split_corpus(load_corpus(None), "val")["text"][0]
    assert tok.decode(docs[0][:-1]) == text


def test_train_batches(stdlib_data):
    train, _, _, _ = stdlib_data
    batch = next(iter(build_dataloader(train, micro_batch_size=2, seed=0)))
    assert batch["input_ids"].shape == (1, 4096) and batch["cu_seqlens"][-1] == 4096
    assert (batch["labels"] != -100).sum() > 4000
