"""The on-disk cache of `data/`: where it lives, how keys are made, how files appear atomically.

Everything `data/` derives (the trained tokenizer, token streams, packed samples) goes under one cache
directory: `$MOBA_CACHE` when the environment variable is set, else `<repo>/.cache/data`
(git-ignored). Entries are named by a key hashed from everything they depend on, so a changed input
makes a new entry instead of reusing a stale one. Entries appear by `os.replace` / `os.rename` of a
finished temporary file or directory, so a killed run never leaves a half-written entry behind; two
processes racing on the same key both finish and one result is kept (they are identical).
"""

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """The data cache directory: `$MOBA_CACHE` if that is set (and not empty), else `<repo>/.cache/data`."""
    root = os.environ.get("MOBA_CACHE")
    return Path(root).expanduser() if root else REPO_ROOT / ".cache" / "data"


def cache_key(*parts: object) -> str:
    """A 16-hex-digit key hashed from JSON-serialisable `parts` (order matters)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling file and `os.replace` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that is renamed to `final` when the block succeeds.

    On an exception the temporary directory is removed and `final` is left untouched. If another
    process created `final` meanwhile, its copy is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
