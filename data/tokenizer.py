"""Text <-> token ids: a SentencePiece model trained on the corpus, or a HF tokenizer from a directory.

`load_tokenizer(spec, ...)` picks the kind from `data.tokenizer`:
- `None` (default): a SentencePiece unigram model trained on the training documents at first use
  (a deterministic sample of at most `TRAIN_CHARS` characters, so it takes seconds on 2 cores) and
  cached as `<cache_dir>/tokenizer/spm-<key>.model`, the key hashed from (corpus identity, vocab size,
  trainer settings). Normalisation is the identity and byte fallback is on, so any text encodes and
  `decode(encode(text)) == text` exactly (code keeps its whitespace). Ids: unk 0, bos 1, eos 2, pad 3.
- a directory: `transformers.AutoTokenizer.from_pretrained(dir)` (e.g. the model being continued).
- a `*.model` file: that SentencePiece model.

Token ids are plain Python ints; documents are encoded without special tokens (packing appends EOS).
"""

import hashlib
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

from .cache import atomic_write_bytes, cache_key

logger = logging.getLogger(__name__)

TRAIN_CHARS = 4_000_000  # characters of training text sampled for SentencePiece training
CHUNK_CHARS = 2_000  # documents are fed to the trainer in chunks of whole lines up to this size
MIN_VOCAB_SIZE = 512  # 256 byte pieces + specials + characters must fit
SPM_SETTINGS = dict(
    model_type="unigram",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary instead of an error
    max_sentence_length=4 * CHUNK_CHARS,  # bytes
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model")


class Tokenizer:
    """Common interface of the tokenizers `data/` uses.

    Attributes: `vocab_size` (int, number of ids incl. specials: the model's embedding rows),
    `eos_id` (int), `bos_id` (int or None), `pad_id` (int, eos when the tokenizer has no pad token),
    `fingerprint` (str identifying the vocabulary, used in cache keys), `name` (str for logs).
    """

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int
    fingerprint: str
    name: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer into `directory` (an exported model dir), loadable as `data.tokenizer`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids`."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file as a `Tokenizer` (encoding uses all cores)."""

    def __init__(self, model_file: Path):
        model = Path(model_file).read_bytes()
        self._model_bytes = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer={model_file} has no eos piece")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.fingerprint = "spm-" + hashlib.sha256(model).hexdigest()[:16]
        self.name = f"sentencepiece {model_file}"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def __getstate__(self):  # the processor is rebuilt from the model bytes (datasets.map worker processes)
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


    def save(self, directory: str | os.PathLike) -> None:
        """Writes `tokenizer.model` (the SentencePiece model) into `directory`."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self._model_bytes)


class HFTokenizer(Tokenizer):
    """A HF tokenizer directory (`AutoTokenizer.from_pretrained`) as a `Tokenizer`."""

    def __init__(self, directory: Path):
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory))
        except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
            raise ValueError(f"data.tokenizer={directory} holds no loadable HF tokenizer: {e}") from e
        if self._tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer={directory} has no eos token (packing needs one)")
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        h = hashlib.sha256(type(self._tok).__name__.encode())
        for fname in HF_TOKENIZER_FILES:
            if (directory / fname).is_file():
                h.update(fname.encode() + b"\0" + (directory / fname).read_bytes())
        self.fingerprint = "hf-" + h.hexdigest()[:16]
        self.name = f"HF {type(self._tok).__name__} {directory}"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the HF tokenizer files into `directory` (`save_pretrained`)."""
        self._tok.save_pretrained(str(directory))


def tokenizer_in(directory: str | os.PathLike | None) -> str | None:
    """The tokenizer saved in a model directory, as a `data.tokenizer` value: the directory when it holds
    an HF tokenizer config, its `tokenizer.model` when it holds only a SentencePiece model, else None."""
    if directory is None or not Path(directory).is_dir():
        return None
    d = Path(directory)
    if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
        return str(d)
    if (d / "tokenizer.model").is_file():
        return str(d / "tokenizer.model")
    return None


def _training_chunks(texts: list[str], max_chars: int, seed: int = 0) -> Iterator[str]:
    """Chunks of whole lines (at most `CHUNK_CHARS` each) from the documents in a seeded random order,
    until `max_chars` characters are given. Lines longer than a chunk are cut."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    given = 0
    for i in order:
        chunk = ""
        for line in texts[i].splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > CHUNK_CHARS:
                yield chunk
                given += len(chunk)
                chunk = ""
                if given >= max_chars:
                    return
            chunk += line[:CHUNK_CHARS]
        if chunk:
            yield chunk
            given += len(chunk)
        if given >= max_chars:
            return


def train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """Train a SentencePiece model on (a sample of at most `TRAIN_CHARS` characters of) `texts`.

    Returns the serialised model. The vocabulary may come out smaller than `vocab_size` when the text
    is too small to support it. Deterministic for the same input (seeded sampling and trainer).
    """
    spm.set_random_generator_seed(0)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(texts, TRAIN_CHARS),
        model_writer=out,
        vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **SPM_SETTINGS,
    )
    return out.getvalue()


def load_tokenizer(
    spec: str | os.PathLike | None,
    *,
    corpus_id: str,
    train_texts: Callable[[], list[str]] | None,
    vocab_size: int = 8192,
    cache_dir: Path,
) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (`spec`); see the module docstring for the three kinds.

    Args:
      spec: None (train/reuse a SentencePiece model), a HF tokenizer directory, or a `*.model` file.
      corpus_id: identity of the corpus (`corpus_fingerprint`), part of the cached model's key.
      train_texts: a callable returning the training documents' texts (list of str); called only when a
        SentencePiece model must be trained.
      vocab_size: target vocabulary size for training (ignored for a given tokenizer).
      cache_dir: the data cache directory; the trained model lives in `cache_dir/tokenizer/`.
    Raises `ValueError` naming `data.tokenizer` when `spec` is neither a directory nor a `*.model` file or
    holds no usable tokenizer, and naming `data.vocab_size` when it is below `MIN_VOCAB_SIZE`.
    """
    if spec is not None:
        p = Path(spec).expanduser()
        if p.is_dir():
            tok = HFTokenizer(p)
        elif p.is_file() and p.suffix == ".model":
            tok = SentencePieceTokenizer(p)
        else:
            raise ValueError(
                f"data.tokenizer={spec} must be a HF tokenizer directory or a SentencePiece .model file"
            )
        logger.info("tokenizer: %s, vocab %d", tok.name, tok.vocab_size)
        return tok

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"data.vocab_size={vocab_size} must be an integer >= {MIN_VOCAB_SIZE}")
    key = cache_key("spm", corpus_id, vocab_size, TRAIN_CHARS, CHUNK_CHARS, SPM_SETTINGS)
    model_file = cache_dir / "tokenizer" / f"spm-{key}.model"
    trained = not model_file.is_file()
    if trained:
        start = time.perf_counter()
        atomic_write_bytes(model_file, train_sentencepiece(train_texts(), vocab_size))
    tok = SentencePieceTokenizer(model_file)
    # The vocabulary the model has: a small corpus gives fewer pieces than data.vocab_size asks for.
    if trained:
        logger.info("tokenizer: trained SentencePiece (vocab %d, data.vocab_size=%d) in %.1f s -> %s",
                    tok.vocab_size, vocab_size, time.perf_counter() - start, model_file)
    else:
        logger.info("tokenizer: reusing %s (vocab %d)", model_file, tok.vocab_size)
    return tok
