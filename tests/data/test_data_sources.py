"""Bad input: every case is counted in stats.json under a reason or stops with an error naming the file, the
row and the field (never a datasets / Arrow traceback); source settings are checked naming the setting."""

import json

import datasets
import pytest

from data.prepare import PrepareConfig, prepare
from data.sources import Source, parse_sources, read_rows


@pytest.fixture
def run(tmp_path, tiny_spm):
    """`run(path=..., **settings)` -> stats of `python -m data.prepare` into a fresh directory."""
    count = iter(range(100))

    def go(**settings):
        settings.setdefault("seq_len", 64)
        cfg = PrepareConfig(tokenizer=str(tiny_spm), output_dir=str(tmp_path / f"out{next(count)}"), num_proc=1,
                            histogram=False, cache_dir=str(tmp_path / "cache"), **settings)
        return prepare(cfg)

    return go


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_rows_are_counted_by_reason(tmp_path, run, word_text):
    # a long run of nulls first (datasets' JSON reader infers a null column from it and fails later)
    lines = ['{"text": null}'] * 3000 + [json.dumps({"text": word_text(i, 30)}) for i in range(40)]
    lines += ['{"text": ""}', '{"text": " \\n\\t "}', '{"title": "no text field"}', "",
              b'{"text": "caf\xe9 ol\xe9 ' + json.dumps(word_text(99, 5))[1:-1].encode() + b'"}']
    f = write_lines(tmp_path / "rows.jsonl", lines)
    stats = run(path=str(f))
    assert stats["dropped"] == {"missing_field": 1, "null_text": 3000, "empty": 1, "whitespace_only": 1}
    assert stats["repaired"] == {"undecodable_bytes": 1}
    src = stats["sources"][0]
    assert src["rows_read"] == 3044 and src["documents_kept"] == 41  # the blank line is not a row
    assert src["train_documents"] + src["val_documents"] == 41
    repaired = [text for _, _, text, reason, fixed in read_rows(Source(str(f))) if fixed]
    assert len(repaired) == 1 and repaired[0].startswith("caf\ufffd ol\ufffd ")


def test_text_directory_bytes_are_repaired_the_same_way(tmp_path, run, word_text):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"caf\xe9 " + word_text(0, 50).encode())
    (tmp_path / "docs" / "b.md").write_text(word_text(1, 50))
    (tmp_path / "docs" / "c.txt").write_text("   \n")
    stats = run(path=str(tmp_path / "docs"))
    assert stats["repaired"] == {"undecodable_bytes": 1} and stats["dropped"]["whitespace_only"] == 1


@pytest.mark.parametrize(
    "lines, message",
    [
        pytest.param(['{"text": "fine"}', '{"text": 5}'],
                     r"bad.jsonl line 2 field 'text': expected a string, got int 5", id="int"),
        pytest.param(['{"text": ["a", "b"]}'], r"bad.jsonl line 1 field 'text': expected a string, got list",
                     id="list"),
        pytest.param(['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], r"bad.jsonl line 3: not valid JSON",
                     id="malformed"),
        pytest.param(['{"text": "a"}', "[1, 2]"], r"bad.jsonl line 2: expected a JSON object, got list",
                     id="not-object"),
        pytest.param([], r"data.path=.*bad.jsonl yields no document: 0 rows read", id="empty-file"),
        pytest.param(['{"text": null}', '{"text": "  "}'],
                     r"yields no document: 2 rows read, dropped \{'null_text': 1, 'whitespace_only': 1\}",
                     id="all-dropped"),
    ],
)
def test_unusable_rows_name_file_row_and_field(tmp_path, run, lines, message):
    f = write_lines(tmp_path / "bad.jsonl", lines) if lines else tmp_path / "bad.jsonl"
    f.touch()
    with pytest.raises(ValueError, match=message):
        run(path=str(f))


def test_table_files(tmp_path, run, word_text):
    texts = [word_text(i, 40) for i in range(12)]
    datasets.Dataset.from_dict({"body": texts[:-2] + [None, ""]}).to_parquet(str(tmp_path / "t.parquet"))
    stats = run(path=str(tmp_path / "t.parquet"), text_field="body")
    assert stats["dropped"]["null_text"] == 1 and stats["dropped"]["empty"] == 1
    assert stats["sources"][0]["documents_kept"] == 10

    datasets.Dataset.from_dict({"text": list(range(3))}).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(ValueError, match=r"ints.parquet row 0 field 'text': expected a string, got int 0"):
        run(path=str(tmp_path / "ints.parquet"))

    (tmp_path / "array.json").write_text(json.dumps([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]))
    assert run(path=str(tmp_path / "array.json"))["sources"][0]["documents_kept"] == 12

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    assert run(path=str(tmp_path / "saved"))["sources"][0]["documents_kept"] == 12
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert run(path=str(arrow))["sources"][0]["documents_kept"] == 12


@pytest.mark.parametrize("packing, truncated", [pytest.param("best_fit", 0, id="best_fit"),
                                                pytest.param("concat", 0, id="concat"),
                                                pytest.param("pad", None, id="pad")])
def test_documents_far_longer_than_seq_len(tmp_path, run, word_text, packing, truncated):
    f = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": word_text(i, 20)}) for i in range(10)]
                    + [json.dumps({"text": word_text(50, 3000)})])
    stats = run(path=str(f), seq_len=32, packing=packing)
    long = [s for s in (stats, stats["val"]) if s["documents_longer_than_seq_len"]]
    assert sum(s["documents_longer_than_seq_len"] for s in (stats, stats["val"])) >= 1
    if truncated is not None:
        assert stats["tokens_truncated"] == stats["val"]["tokens_truncated"] == truncated
    else:
        assert long[0]["tokens_truncated"] > 20 * 32


def test_an_empty_source_among_several_is_named(tmp_path, run, word_text):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps({"text": word_text(i, 20)}) for i in range(5)])
    empty = write_lines(tmp_path / "empty.jsonl", ['{"text": null}'])
    with pytest.raises(ValueError, match=r"data.sources\[1\] \(path=.*empty.jsonl\) yields no document"):
        run(sources=[{"path": str(good)}, {"path": str(empty)}])


@pytest.mark.parametrize(
    "spec, message",
    [
        pytest.param([{"path": None, "weight": 0}], r"data.sources\[0\].weight=0 must be > 0", id="weight-0"),
        pytest.param([{"path": None, "weight": "a"}], r"data.sources\[0\].weight='a' must be a number",
                     id="weight-str"),
        pytest.param([{"path": None, "wieght": 1}], r"data.sources\[0\] has unknown keys \['wieght'\]", id="typo"),
        pytest.param([{"weight": 1}], r"data.sources\[0\]=.* must be a mapping with a 'path' key", id="no-path"),
        # what YAML makes of {path:x,weight:1} in a config file (no space after the colons): keys without values
        pytest.param([{"path:/x.jsonl": None, "weight:1": None}],
                     r"must be a mapping with a 'path' key \(YAML reads `path:x` without a space after the colon",
                     id="no-space-after-colon"),
        pytest.param([{"path": None}, {"path": None}], r"data.sources\[1\].name='stdlib' is used", id="same-name"),
        pytest.param([{"path": "/no/such/file.jsonl"}], r"data.sources\[0\].path=/no/such/file.jsonl does not exist",
                     id="missing"),
        pytest.param([{"path": None, "length_upsample": {"min_tokens": 0, "share": 0.5}}],
                     r"data.sources\[0\].length_upsample.min_tokens=0", id="upsample-min"),
        pytest.param([{"path": None, "length_upsample": {"min_tokens": 9, "share": 1.0}}],
                     r"data.sources\[0\].length_upsample.share=1.0 must be in \(0, 1\)", id="upsample-share"),
        pytest.param([], r"data.sources=\[\] must be a non-empty list", id="empty-list"),
    ],
)
def test_bad_source_settings_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sources(spec, None)


def test_bad_suffix_names_data_path(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data.path=.*x.csv: a file must end in"):
        parse_sources(None, str(tmp_path / "x.csv"))
