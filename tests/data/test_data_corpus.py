"""Corpus loading (directory, jsonl, parquet, stdlib), the validation split, and errors naming data.path."""

import json
import re

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
        # rows the table reader cannot take: the first bad row, named as python -m data.prepare names it
        pytest.param("x.jsonl", '{"text": "a"}\n{"text": 5}\n', "x.jsonl: line 2 field 'text': expected a string, got "
                     r"int 5 \(a table's text is read from its 'text' field; python -m data.prepare "
                     r"data.text_field=<column>",
                     id="mixed-types"),
        pytest.param("x.jsonl", '{"text": 5}\n{"text": 7}\n', "x.jsonl: line 1 field 'text': expected a string",
                     id="numbers-only"),
        pytest.param("x.jsonl", '{"text": "a"}\n{"text": "b', "x.jsonl: line 2: not valid JSON", id="truncated"),
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


def test_package_documents_group_top_level_folders_in_path_order(tmp_path):
    """data.documents=package: one document per top-level entry; a folder's files in sorted path order, each
    opened by a header naming it; whitespace-only files left out; a top-level file stays alone."""
    from data.corpus import FILE_HEADER

    files = {"pkg/__init__.py": "A = 1\n", "pkg/sub/b.py": "def b():\n    pass\n\n", "pkg/a.py": "import os",
             "pkg/empty.py": "  \n", "solo.py": "x = 2\n", "other/z.txt": "zed\n", "only_empty/e.txt": "\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    ds = load_corpus(tmp_path, documents="package")
    assert ds["name"] == ["other", "pkg", "solo.py"]
    h = FILE_HEADER.format
    assert ds["text"] == [h(name="other/z.txt") + "zed\n",
                          h(name="pkg/__init__.py") + "A = 1\n" + h(name="pkg/a.py") + "import os\n"
                          + h(name="pkg/sub/b.py") + "def b():\n    pass\n",
                          h(name="solo.py") + "x = 2\n"]
    # the module level of the same directory is untouched
    assert load_corpus(tmp_path)["name"] == ["other/z.txt", "pkg/__init__.py", "pkg/a.py", "pkg/sub/b.py", "solo.py"]


def test_package_documents_of_one_top_level_folder_are_refused_naming_the_folder_to_use(tmp_path):
    """One top-level folder made one package document: train and val were the same text (a warning only), so
    the validation loss measured memorisation. The error names the setting, the path and the folder to use."""
    from data import build_data

    for name in ("repo/a.py", "repo/sub/b.py", "repo/c.md", ".git/x.txt", "repo/empty.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("" if "empty" in name else f"text of {name}\n")
    message = re.escape(f"data.documents=package: data.path={tmp_path} holds one top-level entry (repo), so the "
                        "corpus is one document and the train and validation splits would be the same text; set "
                        f"data.path={tmp_path / 'repo'} to make each entry of that folder a document, or use "
                        "data.documents=module")
    with pytest.raises(ValueError, match=message):
        load_corpus(tmp_path, documents="package")
    with pytest.raises(ValueError, match=message):  # before any tokenizer is trained or data cached
        build_data(path=str(tmp_path), seq_len=64, documents="package", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokens").exists()
    # what the error says to do works: the folder's entries (a.py, c.md, sub/) are the documents
    assert load_corpus(tmp_path / "repo", documents="package")["name"] == ["a.py", "c.md", "sub"]
    assert len(load_corpus(tmp_path)) == 3  # module level: one document per file
    solo = tmp_path / "solo"
    solo.mkdir()
    (solo / "only.txt").write_text("one file\n")
    with pytest.raises(ValueError, match=re.escape(f"data.path={solo} holds one top-level entry (only.txt), so the "
                                                   "corpus is one document and the train and validation splits would "
                                                   "be the same text; add documents")):
        load_corpus(solo, documents="package")


def test_stdlib_package_documents_hold_every_module_and_are_long():
    modules = load_corpus(None)
    packages = load_corpus(None, documents="package")
    assert len(packages) < len(modules) / 2
    from data.corpus import FILE_HEADER

    expected = {}  # every module, in path order, under its top-level package
    for name, text in zip(modules["name"], modules["text"]):
        expected.setdefault(name.split("/", 1)[0], []).append(FILE_HEADER.format(name=name) + text.rstrip("\n"))
    assert packages["name"] == list(expected)
    assert packages["text"] == ["\n".join(parts) + "\n" for parts in expected.values()]
    longest = max(len(t) for t in packages["text"])
    assert longest > 2_000_000  # about 10^5-10^6 tokens: the longest module holds a few 10^4
    assert longest > 10 * max(len(t) for t in modules["text"])


@pytest.mark.parametrize("documents,path_kind,message", [
    ("file", "dir", "data.documents='file' must be one of module, package"),
    ("package", "table", "data.documents=package groups the files of a directory"),
])
def test_bad_documents_setting_names_it(tmp_path, documents, path_kind, message):
    path = tmp_path
    if path_kind == "table":
        path = tmp_path / "t.jsonl"
        path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_corpus(path, documents=documents)


def test_documents_check_names_the_setting_it_is_given(tmp_path):
    """One check serves data.* and eval.*: the error names the setting the value came from, and the fix."""
    from data.corpus import check_documents

    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"text": "a"}) + "\n")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "prepared.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(f"data.documents=package groups the files of a directory (or the "
                                                   f"stdlib) by top-level folder; data.path={prepared} is a prepared "
                                                   "directory, whose documents python -m data.prepare fixed: use "
                                                   "data.documents=module")):
        check_documents("package", prepared)
    with pytest.raises(ValueError, match=re.escape(f"eval.documents=package groups the files of a directory (or the "
                                                   f"stdlib) by top-level folder; eval.data_path={table} is a table "
                                                   "file: use eval.documents=module")):
        check_documents("package", table, key="eval.documents", path_key="eval.data_path")
    with pytest.raises(ValueError, match=re.escape("eval.documents='file' must be one of module, package")):
        check_documents("file", tmp_path, key="eval.documents")
    for documents, path in (("package", tmp_path), ("package", None), ("module", table), ("module", prepared)):
        check_documents(documents, path, key="eval.documents")  # passes


def test_length_summary_hand_worked():
    from data.build import length_summary

    # 6 documents; those longer than 100 tokens hold (150 + 300) of 600 tokens = 75%
    assert length_summary([10, 50, 40, 150, 300, 50], 100) == (
        "6 documents, tokens min 10 / median 50 / max 300, 75.0% of tokens in documents longer than seq_len 100")
