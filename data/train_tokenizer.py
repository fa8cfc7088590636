"""`python -m data.train_tokenizer`: train a SentencePiece model on a source and write `<output_dir>/tokenizer.model`.

    python -m data.train_tokenizer data.path=/data/books.jsonl data.vocab_size=32000 data.output_dir=tok/books
    python -m data.prepare data.path=/data/books.jsonl data.tokenizer=tok/books/tokenizer.model ...

Same settings as `python -m data.prepare` (`data.path` or `data.sources`, `data.text_field`,
`data.vocab_size`, `data.seed`); rows are checked the same way (`data.sources`). The model is trained on a
seeded sample of about `data.tokenizer.TRAIN_CHARS` characters of the documents, with the settings of
`data.tokenizer.SPM_SETTINGS` (byte fallback, identity normalisation, ids unk 0, bos 1, eos 2, pad 3).
"""

import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from .prepare import PrepareConfig, _sample_texts, compose, read_sources
from .sources import parse_sources
from .tokenizer import MIN_VOCAB_SIZE, SentencePieceTokenizer, train_sentencepiece


def train_tokenizer(cfg: PrepareConfig) -> Path:
    """Train SentencePiece on the documents of `cfg`'s sources; returns the written `tokenizer.model` path.

    Raises `ValueError` naming `data.output_dir` (unset), `data.vocab_size` (< 512), or the source /
    file, row and field of input that cannot be used (as `python -m data.prepare`)."""
    if not cfg.output_dir:
        raise ValueError("data.output_dir=None: name the directory to write tokenizer.model into")
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"data.vocab_size={cfg.vocab_size} must be an integer >= {MIN_VOCAB_SIZE}")
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    try:
        rows = read_sources(parse_sources(cfg.sources, cfg.path, cfg.text_field), work)
        keep = np.flatnonzero(rows.select_columns(["drop"]).with_format("numpy")[:]["drop"].astype(str) == "")
        if len(keep) == 0:
            raise ValueError(f"data.path={cfg.path} / data.sources yields no document to train a tokenizer on")
        model = train_sentencepiece(_sample_texts(rows, keep, cfg.seed), cfg.vocab_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "tokenizer.model").write_bytes(model)
    return out / "tokenizer.model"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a bad setting or bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = train_tokenizer(compose(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}); use it with data.tokenizer={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
