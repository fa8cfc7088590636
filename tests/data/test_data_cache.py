"""Cache location and atomic writes."""

import pytest

from data import default_cache_dir
from data.cache import REPO_ROOT, atomic_directory, atomic_write_bytes, cache_key


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOBA_CACHE", raising=False)
    assert default_cache_dir() == REPO_ROOT / ".cache" / "data"
    monkeypatch.setenv("MOBA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_cache_key_depends_on_every_part():
    assert cache_key("a", 1) == cache_key("a", 1)
    assert len({cache_key("a", 1), cache_key("a", 2), cache_key(1, "a"), cache_key("a", 1, None)}) == 4


def test_atomic_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.npy").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "whole.npy").write_bytes(b"x")
        assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (final / "whole.npy").is_file()
    with atomic_directory(final) as tmp:  # a racing writer: the first copy is kept
        (tmp / "other.npy").write_bytes(b"y")
    assert [p.name for p in final.iterdir()] == ["whole.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "sub" / "model"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and [p.name for p in path.parent.iterdir()] == ["model"]
