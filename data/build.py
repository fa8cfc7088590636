"""`build_data`: corpus -> tokenizer -> token stream -> packed samples, each step cached on disk.

Cache layout under `cache_dir` (keys are 16 hex digits hashed from everything the entry depends on):
  tokenizer/spm-<key>.model   the trained SentencePiece model   (corpus identity, vocab size, settings)
  tokens/<key>/               tokens.npy int32 (N,), doc_lens.npy int64 (D,), meta.json
                              (corpus identity, tokenizer identity, split)
  packed/<key>/               shards and boundaries, see `data.packing`
                              (token stream key, seq_len, packing)
  hf/                         `datasets`' cache when `data.path` is a .jsonl/.json/.parquet file
A new `seq_len` or packing mode reuses the token stream; only the packing is redone.

Distributed use: run it on one rank per node first (or rank 0 with a shared cache) and the others after
a barrier; they then only read the cache. Concurrent builders are safe (entries appear atomically), just
wasteful.
"""

import functools
import json
import logging
import os
import time
from pathlib import Path

from .cache import atomic_directory, cache_key, default_cache_dir
from .corpus import SPLITS, check_documents, corpus_fingerprint, load_corpus, split_corpus
from .packing import (
    PackedDataset,
    check_packing_args,
    load_token_stream,
    pack,
    save_token_stream,
    tokenize_documents,
    write_packed,
)
from .prepared import is_prepared, load_prepared
from .tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the token stream or packed layout changes


def length_summary(doc_lens, seq_len: int) -> str:
    """The document length distribution in tokens: count, min / median / max, and the share of tokens that
    lie in documents longer than ``seq_len`` (the documents whose attention spans a whole sample)."""
    import numpy as np

    lens = np.asarray(doc_lens, dtype=np.int64)
    if lens.size == 0:
        return "no documents"
    long_share = lens[lens > seq_len].sum() / max(int(lens.sum()), 1)
    return (f"{lens.size} documents, tokens min {lens.min()} / median {int(np.median(lens))} / max {lens.max()}, "
            f"{100 * long_share:.1f}% of tokens in documents longer than seq_len {seq_len}")


def build_data(
    path: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    seq_len: int = 2048,
    packing: str = "concat",
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    documents: str = "module",
) -> tuple[PackedDataset, Tokenizer]:
    """Build (or load from the cache) the packed samples of one split, and the tokenizer.

    Args (named after the `data.*` config keys):
      path: `data.path`: None = the Python stdlib sources; a directory of *.txt/*.py/*.md files; a
        .jsonl/.json/.parquet file with a `text` column (see `data.corpus`); or a directory written by
        `python -m data.prepare`, read as it is (no cache; see `data.prepared.load_prepared`).
      tokenizer: `data.tokenizer`: None = a SentencePiece model trained on the training split at first
        use and cached; a HF tokenizer directory; or a SentencePiece `.model` file.
      vocab_size: `data.vocab_size`: vocabulary of the trained SentencePiece model (>= 512; a tiny corpus
        may give fewer). Use the returned `tokenizer.vocab_size` for the model's embedding.
      seq_len: `data.seq_len`: tokens per sample (>= 2).
      packing: `data.packing`: "concat" (documents end to end, cut at sample boundaries), "pad" (one
        document per sample, truncated and padded) or "best_fit"; see `data.packing`.
      split: "train" or "val" (about 2% of the documents, chosen by a hash of their names).
      cache_dir: `data.cache_dir`: None = `$MOBA_CACHE` or `<repo>/.cache/data`.
      documents: `data.documents`: "module" (one document per file) or "package" (one per top-level folder
        of the stdlib or the directory, its files concatenated; see `data.corpus`).
    Returns `(dataset, tokenizer)`: a `PackedDataset` whose items are dicts of `input_ids`, `labels`,
    `position_ids` (int64 (seq_len,)) and `cu_seqlens` (int32 (segments + 1,)), and the `Tokenizer`.
    Raises `ValueError` naming the `data.*` setting (or `split`) that is wrong: a path that does not exist
    or yields no documents, a tokenizer that cannot be loaded (or that is not a prepared directory's own),
    `vocab_size < 512` for a trained tokenizer,
    `seq_len < 2`, an unknown packing mode, an unknown `documents` mode or `package` for a table file.
    The document length distribution of the split (`length_summary`) is logged on every call.
    """
    check_packing_args(seq_len, packing)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    check_documents(documents, path)
    if is_prepared(path):
        return load_prepared(path, split, tokenizer, seq_len, packing)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    corpus_id = corpus_fingerprint(path)
    if documents != "module":  # module-level keys stay as they were, so existing caches stay valid
        corpus_id = cache_key(corpus_id, documents)

    @functools.cache
    def split_docs(which: str):
        corpus = load_corpus(path, cache_dir=cache, documents=documents)
        logger.info("corpus %s: %d documents (%s level)", path or "stdlib", len(corpus), documents)
        return split_corpus(corpus, which)

    tok = load_tokenizer(tokenizer, corpus_id=corpus_id, train_texts=lambda: split_docs("train")["text"],
                         vocab_size=vocab_size, cache_dir=cache)

    stream_key = cache_key(FORMAT_VERSION, corpus_id, tok.fingerprint, split)
    stream_dir = cache / "tokens" / stream_key
    if not stream_dir.is_dir():
        start = time.perf_counter()
        docs = split_docs(split)
        tokens, doc_lens = tokenize_documents(docs["text"], tok)
        with atomic_directory(stream_dir) as tmp:
            save_token_stream(tmp, tokens, doc_lens)
            meta = {"path": str(path), "documents": documents, "split": split, "tokenizer": tok.name,
                    "num_docs": len(doc_lens),
                    "num_tokens": len(tokens)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        logger.info("tokenized %s split: %d documents, %d tokens in %.1f s -> %s",
                    split, len(doc_lens), len(tokens), time.perf_counter() - start, stream_dir)

    tokens, doc_lens = load_token_stream(stream_dir)
    logger.info("%s split documents: %s", split, length_summary(doc_lens, seq_len))
    packed_dir = cache / "packed" / cache_key(stream_key, seq_len, packing)
    if not packed_dir.is_dir():
        with atomic_directory(packed_dir) as tmp:
            meta = {"path": str(path), "split": split, "packing": packing, "pad_id": tok.pad_id,
                    "num_docs": len(doc_lens), "num_tokens": len(tokens), "token_stream": stream_key}
            write_packed(tmp, pack(tokens, doc_lens, seq_len, packing, tok.pad_id), meta)

    dataset = PackedDataset(packed_dir)
    m = dataset.meta
    logger.info(
        "data %s split: %d documents, %d tokens -> %d samples of %d tokens (%s packing, %d segments, "
        "%d tokens dropped by truncation)",
        split, m["num_docs"], m["num_tokens"], len(dataset), seq_len, packing, m["num_segments"],
        m["num_tokens"] - m["num_packed_tokens"],
    )
    return dataset, tok
