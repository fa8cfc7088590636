"""Fixtures for `data/` tests: a tiny text corpus, a session cache, and packing-invariant checks.

Test modules are named `test_data_*.py` so their basenames do not collide with other test folders
(the test folders are not packages); shared helpers are fixtures, not imports from this file.
"""

import random

import numpy as np
import pytest
import torch

from data import build_data, load_corpus, split_corpus

WORDS = "the a of def class return import self value data token block attention MoBA 42 7 ü 東京 🎉".split()
DOC_WORDS = [0, 1, 3, 9, 30, 120, 400, 900, 1600, 50, 2, 250]  # 0 = an empty document, which is dropped


def _text(rng: random.Random, num_words: int) -> str:
    lines, line = [], []
    for _ in range(num_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.15:
            lines.append(" " * rng.choice([0, 4, 8]) + " ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)]) + "\n"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory of a few .txt/.md/.py documents of very different lengths, plus files to skip."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    (root / "sub").mkdir()
    (root / ".hidden").mkdir()
    for i, n in enumerate(DOC_WORDS):
        suffix = (".txt", ".md", ".py")[i % 3]
        folder = root / "sub" if i % 4 == 3 else root
        (folder / f"doc{i:02d}{suffix}").write_text(_text(rng, n) if n else "  \n")
    (root / ".hidden" / "skipped.txt").write_text("never read")
    (root / "skipped.json").write_text('{"text": "not a text suffix"}')
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def build_tiny(tiny_corpus, session_cache):
    """`build_tiny(seq_len=..., packing=..., split=...)` -> (PackedDataset, Tokenizer) on the tiny corpus."""

    def build(**kwargs):
        kwargs.setdefault("seq_len", 64)
        return build_data(path=tiny_corpus, vocab_size=1024, cache_dir=session_cache, **kwargs)

    return build


def _document_tokens(path, tokenizer, split):
    """Each document of `split`, encoded independently of the packing code, with EOS appended."""
    docs = split_corpus(load_corpus(path), split)
    return [tokenizer.encode(text) + [tokenizer.eos_id] for text in docs["text"]]


def _check_concat_invariants(dataset, docs):
    """Check the packed concat `dataset` against the documents' token lists `docs` (lists of ints).

    Everything expected is computed here from the documents and the cut positions only.
    """
    seq_len, pad_id = dataset.seq_len, dataset.pad_id
    stream = np.concatenate([np.asarray(d) for d in docs])
    n = len(stream)
    doc_ends = np.cumsum([len(d) for d in docs])
    assert len(dataset) == -(-n // seq_len)  # nothing dropped: the last sample is padded

    samples = [dataset[i] for i in range(len(dataset))]
    ids, labels, positions = (np.concatenate([s[k].numpy() for s in samples])
                              for k in ("input_ids", "labels", "position_ids"))
    bounds = set()
    for i, sample in enumerate(samples):
        for key in ("input_ids", "labels", "position_ids"):
            assert sample[key].dtype == torch.int64 and sample[key].shape == (seq_len,)
        cu = sample["cu_seqlens"].numpy()
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == seq_len and (np.diff(cu) > 0).all()
        bounds |= {i * seq_len + int(c) for c in cu}

    # no token lost or duplicated, padding only after the stream
    np.testing.assert_array_equal(ids[:n], stream)
    assert (ids[n:] == pad_id).all()
    # boundaries = document ends + sample cuts (+ 0), nothing else
    expected_bounds = {0, *map(int, doc_ends), *range(0, len(ids) + 1, seq_len)}
    assert bounds == expected_bounds
    # positions restart exactly at boundaries and count up in between
    starts = np.zeros(len(ids), bool)
    starts[[b for b in bounds if b < len(ids)]] = True
    assert (positions[starts] == 0).all()
    inner = np.flatnonzero(~starts)
    np.testing.assert_array_equal(positions[inner], positions[inner - 1] + 1)
    # labels: the next token unless the next position starts a document or a sample, -100 on padding
    next_starts = np.union1d(doc_ends, np.arange(0, len(ids) + 1, seq_len))
    expected = np.full(len(ids), -100)
    expected[: n - 1] = stream[1:]
    cut_before = next_starts[(next_starts >= 1) & (next_starts <= n)] - 1
    expected[cut_before] = -100
    np.testing.assert_array_equal(labels, expected)


@pytest.fixture(scope="session")
def document_tokens():
    """`document_tokens(path, tokenizer, split)`: each document's ids + EOS, encoded one by one."""
    return _document_tokens


@pytest.fixture(scope="session")
def check_concat_invariants():
    """`check_concat_invariants(dataset, docs)`: assert the concat packing invariants."""
    return _check_concat_invariants


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory, tiny_corpus):
    """A SentencePiece model (vocab <= 600) trained on the tiny corpus: prepare tests pass it as
    `data.tokenizer` so that none of them trains one."""
    from data.tokenizer import train_sentencepiece

    texts = [p.read_text() for p in sorted(tiny_corpus.rglob("doc*"))] + [_text(random.Random(1), 3000)]
    path = tmp_path_factory.mktemp("tiny_spm") / "tiny.model"
    path.write_bytes(train_sentencepiece(texts, 600))
    return path


@pytest.fixture(scope="session")
def word_text():
    """`word_text(seed, num_words)`: deterministic text of the tiny corpus' words."""
    return lambda seed, num_words: _text(random.Random(seed), num_words)
