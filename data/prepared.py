"""Reading a directory written by `python -m data.prepare` (training's `data.path=<that directory>`).

Layout of a prepared directory:
  prepared.json      the manifest (format, seq_len, packing, pad_id, tokenizer fingerprint, sources with
                     their fingerprints, the settings used); written last, so its presence means complete
  stats.json         counts (see `data.prepare`)
  lengths.png        histogram of document lengths against seq_len
  tokenizer/         the tokenizer the tokens were made with (tokenizer.model, or HF tokenizer files)
  train/, val/       packed shards in the layout of `data.packing` (read by `PackedDataset`)
"""

import hashlib
import json
import os
from pathlib import Path

from .packing import PackedDataset
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, tokenizer_in

MANIFEST = "prepared.json"
FORMAT_VERSION = 1
PROBE_TEXT = "def f(x):\n    return x ** 2  # ü 東京 🎉\n\nThe quick brown fox, 1234567."


def is_prepared(path: str | os.PathLike | None) -> bool:
    """True when `path` is a directory holding a prepared dataset's manifest."""
    return path is not None and (Path(path).expanduser() / MANIFEST).is_file()


def prepared_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a prepared directory: 16 hex digits hashed from its manifest (which names the sources'
    fingerprints, the tokenizer and every setting)."""
    return hashlib.sha256((Path(path).expanduser() / MANIFEST).read_bytes()).hexdigest()[:16]


def _load_spec(spec: str | os.PathLike) -> Tokenizer:
    p = Path(spec).expanduser()
    if p.is_dir():
        return HFTokenizer(p)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    raise ValueError(f"data.tokenizer={spec} must be a HF tokenizer directory or a SentencePiece .model file")


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return (a.vocab_size, a.eos_id, a.bos_id, a.pad_id, a.encode(PROBE_TEXT)) == (
        b.vocab_size, b.eos_id, b.bos_id, b.pad_id, b.encode(PROBE_TEXT))


def load_prepared(path: str | os.PathLike, split: str, tokenizer: str | os.PathLike | None, seq_len: int,
                  packing: str) -> tuple[PackedDataset, Tokenizer]:
    """The packed `split` ("train" / "val") of the prepared directory `path`, and its tokenizer.

    `tokenizer` (`data.tokenizer`): None = the tokenizer stored in the directory; else that tokenizer,
    which must be the stored one (same fingerprint, or the same vocabulary, special ids and encoding of a
    probe text: a re-saved copy of an HF tokenizer). Raises `ValueError` naming `data.seq_len` /
    `data.packing` when they differ from what the directory was prepared with, `data.tokenizer` when it
    is another tokenizer, and `data.path` when the directory is incomplete or of another format.
    """
    root = Path(path).expanduser()
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"data.path={path} was prepared with format {manifest.get('format')}, this version reads "
                         f"{FORMAT_VERSION}: run python -m data.prepare again")
    for key, value in (("seq_len", seq_len), ("packing", packing)):
        if manifest[key] != value:
            raise ValueError(f"data.{key}={value!r} differs from data.path={path}, prepared with "
                             f"data.{key}={manifest[key]!r}: set data.{key}={manifest[key]} or prepare again")
    stored_spec = tokenizer_in(root / "tokenizer")
    if stored_spec is None:
        raise ValueError(f"data.path={path} lacks its tokenizer/ directory: run python -m data.prepare again")
    stored = _load_spec(stored_spec)
    tok = stored if tokenizer is None else _load_spec(tokenizer)
    if tok.fingerprint not in (manifest["tokenizer"], stored.fingerprint) and not _same_tokenizer(tok, stored):
        raise ValueError(f"data.tokenizer={tokenizer} is not the tokenizer data.path={path} was prepared with "
                         f"({stored.name}, vocab {stored.vocab_size}): unset data.tokenizer, or prepare again "
                         "with this tokenizer")
    split_dir = root / split
    if not (split_dir / "meta.json").is_file():
        raise ValueError(f"data.path={path} has no {split}/ split: run python -m data.prepare again")
    return PackedDataset(split_dir), tok
