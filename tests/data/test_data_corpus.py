"""Corpus loading (directory, jsonl, parquet, stdlib), the validation split, and errors naming data.path."""

import json

import datasets
import pytest

from data import corpus_fingerprint, load_corpus, split_corpus, stdlib_dir
from data.corpus import VAL_FRACTION, split_indices


def test_directory_corpus_sorted_skips_hidden_empty_and_other_suffixes(tiny_corpus):
    ds = load_corpus(tiny_corpus)
    assert ds.column_names == ["name", "text"]
    names = ds["name"]
    assert names == sorted(names)
    assert all(n.endswith((".txt", ".md", ".py")) for n in names)
    assert not any(n.startswith(".hidden") for n in names)
    assert "doc00.txt" not in names  # whitespace only
    assert "sub/doc03.txt" in names
    assert ds["text"][names.index("sub/doc03.txt")] == (tiny_corpus / "sub" / "doc03.txt").read_text()


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = corpus_fingerprint(tmp_path)
    assert corpus_fingerprint(tmp_path) == before
    (tmp_path / "b.txt").write_text("two")
    assert corpus_fingerprint(tmp_path) != before


def test_jsonl_with_id_column(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"id": i, "text": f"document {i}"}) + "\n" for i in range(5)))
    ds = load_corpus(f, cache_dir=tmp_path / "cache")
    assert ds["name"] == ["0", "1", "2", "3", "4"]
    assert ds["text"][3] == "document 3"


def test_parquet_without_name_column(tmp_path):
    f = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": ["alpha", "", "gamma"]}).to_parquet(str(f))
    ds = load_corpus(f, cache_dir=tmp_path / "cache")
    assert ds["name"] == ["docs.parquet#0", "docs.parquet#2"]
    assert ds["text"] == ["alpha", "gamma"]


def test_stdlib_corpus_one_document_per_module():
    ds = load_corpus(None)
    names = ds["name"]
    assert len(names) > 500 and names == sorted(names) and len(set(names)) == len(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not any("site-packages" in n or "dist-packages" in n for n in names)
    assert ds["text"][names.index("os.py")] == (stdlib_dir() / "os.py").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "name, content, message",
    [
        pytest.param("missing", None, "does not exist", id="missing"),
        pytest.param(".", None, "yields no documents", id="empty-dir"),
        pytest.param("x.csv", "a,b\n", "must end in", id="bad-suffix"),
        pytest.param("x.jsonl", '{"body": "a"}\n', "no 'text' column", id="no-text-column"),
        pytest.param("x.jsonl", '{"text": " "}\n', "yields no documents", id="blank-jsonl"),
    ],
)
def test_bad_path_names_the_setting(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_corpus(path, cache_dir=tmp_path / ".cache")
    assert f"data.path={path}" in str(err.value)


def test_split_is_deterministic_disjoint_covering_and_about_two_percent():
    names = [f"doc-{i}" for i in range(5000)]
    train, val = split_indices(names, "train"), split_indices(names, "val")
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(5000))
    assert 0.5 * VAL_FRACTION * 5000 < len(val) < 1.5 * VAL_FRACTION * 5000
    reordered = names[::-1]
    assert {reordered[i] for i in split_indices(reordered, "val")} == {names[i] for i in val}  # names only


@pytest.mark.parametrize("count", [pytest.param(2, id="two"), pytest.param(7, id="seven")])
def test_small_corpora_get_one_val_doc_and_keep_training_docs(count):
    names = [f"d{i}" for i in range(count)]
    assert len(split_indices(names, "val")) == 1
    assert len(split_indices(names, "train")) == count - 1


def test_single_document_serves_both_splits():
    assert split_indices(["only"], "train") == split_indices(["only"], "val") == [0]


def test_split_corpus_and_bad_split(tiny_corpus):
    ds = load_corpus(tiny_corpus)
    train, val = split_corpus(ds, "train"), split_corpus(ds, "val")
    assert len(val) >= 1 and len(train) + len(val) == len(ds)
    assert set(train["name"]).isdisjoint(val["name"])
    with pytest.raises(ValueError, match="split='test'"):
        split_corpus(ds, "test")
