"""Sources of documents for `python -m data.prepare`: what `data.sources` (or `data.path`) names, read row by row.

A source is `{path, weight, text_field, name, length_upsample}` (see `Source`). `path` may be:
- `null`: the embedded corpus (the Python standard library's sources, `data.corpus`);
- a directory of `*.txt` / `*.py` / `*.md` files (one document per file, hidden folders skipped);
- a `.jsonl` file (one JSON object per line), a `.json` file (a JSON array of objects, or JSON lines);
- a `.parquet` or `.arrow` file (a table with a string column `text_field`), or a directory written by
  `datasets.Dataset.save_to_disk`;
- an HF hub dataset name (`owner/name`, train split, streamed) where a network exists.

Every row is checked before anything is tokenized. A row is either kept, or dropped and counted under a
reason (`DROP_REASONS`), or stops the run with a `ValueError` naming the file, the row and the field:

  dropped (counted)  missing_field (the row lacks `text_field`), null_text (null / None), empty (""),
                     whitespace_only
  repaired (counted) undecodable_bytes: bytes that are not UTF-8 are decoded with U+FFFD replacement,
                     for text directories and JSON lines alike; the document is kept
  errors             a line that is not valid JSON or not an object; a value that is not a string (a
                     number, a list, ...: usually `text_field` names the wrong column); an empty source
                     (no document kept), naming the counts of what was dropped

Nothing is read through `datasets`' JSON builder, whose schema inference fails on a run of nulls or on
mixed types with a traceback that names neither the file nor the row.
"""

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from .corpus import CORPUS_VERSION, TEXT_SUFFIXES, _stdlib_files, _text_files, stdlib_dir

logger = logging.getLogger(__name__)

DROP_REASONS = ("missing_field", "null_text", "empty", "whitespace_only")
REPAIR_REASONS = ("undecodable_bytes",)
TABLE_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
TABLE_BATCH = 1024  # rows per read from a parquet / arrow table


@dataclass(frozen=True)
class LengthUpsample:
    """Raise the share of tokens from long documents within one source (Fu et al. 2024, Sec. 3).

    `min_tokens`: a document is long when it has more than this many tokens (BOS/EOS included).
    `share`: the target fraction in (0, 1) of the source's tokens that come from long documents.
    """

    min_tokens: int
    share: float


@dataclass(frozen=True)
class Source:
    """One source of documents. `weight` is its target share of the training tokens (normalised over the
    sources); `name` labels it in stats.json (default: the file or directory name, or "stdlib")."""

    path: str | None
    weight: float = 1.0
    text_field: str = "text"
    name: str = ""
    length_upsample: LengthUpsample | None = None

    @property
    def kind(self) -> str:
        """"stdlib", "text_dir", "saved_dataset", "jsonl", "json", "parquet", "arrow" or "hub"."""
        if self.path is None:
            return "stdlib"
        p = Path(self.path).expanduser()
        if p.is_dir():
            return "saved_dataset" if (p / "dataset_info.json").is_file() else "text_dir"
        if p.is_file():
            return p.suffix[1:]
        return "hub"


def _number(value, setting: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{setting}={value!r} must be a number")
    if positive and value <= 0:
        raise ValueError(f"{setting}={value!r} must be > 0")
    return float(value)


def parse_length_upsample(spec, setting: str) -> LengthUpsample | None:
    """`{min_tokens: int >= 1, share: float in (0, 1)}` or None -> `LengthUpsample`. Raises `ValueError`
    naming `setting` (e.g. `data.sources[1].length_upsample`) on a bad value or an unknown key."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"min_tokens", "share"}:
        raise ValueError(f"{setting}={spec!r} must be {{min_tokens: <tokens>, share: <fraction>}} or null")
    m, share = spec["min_tokens"], spec["share"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{setting}.min_tokens={m!r} must be an integer >= 1 (tokens)")
    if not 0 < _number(share, f"{setting}.share") < 1:
        raise ValueError(f"{setting}.share={share!r} must be in (0, 1)")
    return LengthUpsample(int(m), float(share))


def _check_path(path: str | None, setting: str) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_file() and p.suffix not in TABLE_FILE_SUFFIXES:
        raise ValueError(f"{setting}={path}: a file must end in {', '.join(TABLE_FILE_SUFFIXES)} (or give a "
                         f"directory of {', '.join('*' + s for s in TEXT_SUFFIXES)} files)")
    if not p.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise ValueError(f"{setting}={path} does not exist (and is not an HF hub name owner/name)")


def parse_sources(sources, path: str | None, text_field: str = "text", length_upsample=None) -> list[Source]:
    """The sources named by `data.sources` (a list of dicts), or the single `data.path` when it is None.

    Each dict has `path` (required key, null = stdlib), and optional `weight` (> 0, default 1),
    `text_field` (default `data.text_field`), `name` (default from the path), `length_upsample`
    (default `data.length_upsample`). Raises `ValueError` naming `data.sources[i].<key>` and the value for
    an unknown key, a bad weight / path / length_upsample, or two sources with the same name; naming
    `data.sources` when the list is empty.
    """
    if sources is None:
        _check_path(path, "data.path")
        sources = [{"path": path}]
        where = lambda i: "data"  # noqa: E731
    else:
        if not isinstance(sources, (list, tuple)) or not sources:
            raise ValueError(f"data.sources={sources!r} must be a non-empty list of {{path, weight, ...}}")
        where = lambda i: f"data.sources[{i}]"  # noqa: E731
    out, names = [], set()
    for i, spec in enumerate(sources):
        if not isinstance(spec, dict) or "path" not in spec:
            glued = isinstance(spec, dict) and any(":" in str(k) and v is None for k, v in spec.items())
            hint = (" (YAML reads `path:x` without a space after the colon as one key: write {path: x, weight: 1}, "
                    "a space after each colon)" if glued else "")
            raise ValueError(f"{where(i)}={spec!r} must be a mapping with a 'path' key{hint}")
        unknown = set(spec) - {"path", "weight", "text_field", "name", "length_upsample"}
        if unknown:
            raise ValueError(f"{where(i)} has unknown keys {sorted(unknown)} (known: path, weight, text_field, "
                             "name, length_upsample)")
        p = spec["path"]
        p = None if p is None else str(p)
        _check_path(p, f"{where(i)}.path")
        weight = _number(spec.get("weight", 1.0), f"{where(i)}.weight")
        field = spec.get("text_field", text_field)
        if not isinstance(field, str) or not field:
            raise ValueError(f"{where(i)}.text_field={field!r} must be a non-empty string")
        name = spec.get("name") or ("stdlib" if p is None else Path(p).name or p)
        if name in names:
            raise ValueError(f"{where(i)}.name={name!r} is used by another source: give each a distinct name")
        names.add(name)
        up = parse_length_upsample(spec.get("length_upsample", length_upsample), f"{where(i)}.length_upsample")
        out.append(Source(p, weight, field, str(name), up))
    return out


def source_fingerprint(source: Source) -> str:
    """A cheap identity of a source's files (names, sizes, mtimes; the hub name for a hub dataset) and its
    reading settings. Hex string of 16 digits; does not read file contents."""
    h = hashlib.sha256(json.dumps([CORPUS_VERSION, source.kind, source.path, source.text_field]).encode())
    if source.kind == "stdlib":
        root, files = stdlib_dir(), _stdlib_files()
    elif source.kind == "hub":
        return h.hexdigest()[:16]
    else:
        p = Path(source.path).expanduser()
        root, files = (p, sorted(f for f in p.rglob("*") if f.is_file())) if p.is_dir() else (p.parent, [p])
        if source.kind == "text_dir":
            files = _text_files(p)
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Reading rows. Each reader yields (row label, document name, value, repaired) with value the raw value of
# the text field (or the MISSING marker); `check_row` turns it into (text, reason).

MISSING = object()


TEXT_FIELD_HINT = " (is data.text_field / data.sources[].text_field the text column?)"  # data.prepare's settings


def check_row(value, where: str, field: str) -> tuple[str, str]:
    """Classify one row's text value: returns `(text, "")` for a document to keep, or `("", reason)` with
    reason in `DROP_REASONS`. `where` names the file and row for errors ("books.jsonl line 7").

    Raises `ValueError` naming `where` and `field` when the value is not a string.
    """
    if value is MISSING:
        return "", "missing_field"
    if value is None:
        return "", "null_text"
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{where} field {field!r}: expected a string, got {type(value).__name__} {shown}"
                         f"{TEXT_FIELD_HINT}")
    if not value:
        return "", "empty"
    if not value.strip():
        return "", "whitespace_only"
    return value, ""


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _read_text_dir(root: Path, files: list[Path]) -> Iterator[tuple]:
    for f in files:
        text, repaired = _decode(f.read_bytes())
        name = f.relative_to(root).as_posix()
        yield name, name, text, repaired


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}; column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _row_name(obj: dict, fallback: str) -> str:
    for key in ("name", "id"):
        if key in obj and obj[key] is not None:
            return str(obj[key])
    return fallback


def _read_jsonl(path: Path, field: str) -> Iterator[tuple]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line, repaired = _decode(raw)
            if not line.strip():
                continue  # blank lines between records are not rows
            where = f"{path} line {number}"
            obj = _json_object(line, where)
            yield where, _row_name(obj, f"{path.name}#{number}"), obj.get(field, MISSING), repaired


def _read_json(path: Path, field: str) -> Iterator[tuple]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, field)
        return
    text, repaired = _decode(path.read_bytes())
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}; column {e.colno})") from None
    for i, obj in enumerate(rows):
        where = f"{path} row {i}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, _row_name(obj, f"{path.name}#{i}"), obj.get(field, MISSING), repaired


def _read_table(ds: datasets.Dataset, label: str, field: str) -> Iterator[tuple]:
    if field not in ds.column_names:
        for i in range(len(ds)):
            yield f"{label} row {i}", f"{label}#{i}", MISSING, False
        return
    id_column = next((c for c in ("name", "id") if c in ds.column_names), None)
    columns = [field] + ([id_column] if id_column and id_column != field else [])
    i = 0
    for batch in ds.select_columns(columns).iter(batch_size=TABLE_BATCH):
        for j, value in enumerate(batch[field]):
            name = str(batch[id_column][j]) if id_column else f"{Path(label).name}#{i}"
            yield f"{label} row {i}", name, value, False
            i += 1


def _read_hub(name: str, field: str) -> Iterator[tuple]:
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # no network, no such dataset, ...: the hub raises many kinds
        raise ValueError(f"data source path={name}: not a local file or directory, and the HF hub dataset "
                         f"could not be opened ({type(e).__name__}: {e})") from e
    for i, obj in enumerate(stream):
        yield f"{name} row {i}", _row_name(obj, f"{name}#{i}"), obj.get(field, MISSING), False


def read_rows(source: Source) -> Iterator[tuple[str, str, str, str, bool]]:
    """Every row of `source` in a deterministic order, classified.

    Yields `(where, name, text, reason, repaired)`: `where` names the file and row, `name` the document
    (the file's relative path, a `name`/`id` field, or `<file>#<row>`), `text` the text to keep ("" when
    dropped), `reason` "" or one of `DROP_REASONS`, `repaired` True when undecodable bytes were replaced.
    Raises `ValueError` naming the file, row and field for a row that cannot be read (module docstring).
    """
    kind, field = source.kind, source.text_field
    if kind == "stdlib":
        rows = _read_text_dir(stdlib_dir(), _stdlib_files())
    elif kind == "text_dir":
        root = Path(source.path).expanduser()
        rows = _read_text_dir(root, _text_files(root))
    elif kind == "jsonl":
        rows = _read_jsonl(Path(source.path).expanduser(), field)
    elif kind == "json":
        rows = _read_json(Path(source.path).expanduser(), field)
    elif kind in ("parquet", "arrow", "saved_dataset"):
        p = Path(source.path).expanduser()
        try:
            if kind == "parquet":
                ds = datasets.Dataset.from_parquet(str(p), keep_in_memory=False)
            elif kind == "arrow":
                ds = datasets.Dataset.from_file(str(p))
            else:
                ds = datasets.load_from_disk(str(p))
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise ValueError(f"{p}: cannot be read as a {kind} table ({type(e).__name__}: {e})") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        rows = _read_table(ds, str(p), field)
    else:
        rows = _read_hub(source.path, field)
    for where, name, value, repaired in rows:
        text, reason = check_row(value, where, field)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from "\\udc80" escapes in JSON
            text, repaired = text.encode("utf-8", "replace").decode("utf-8"), True
        yield where, name, text, reason, repaired


def default_num_proc(num_proc: int) -> int:
    """`data.num_proc`: 0 = every core (`os.cpu_count()`), else the value itself."""
    return num_proc if num_proc > 0 else (os.cpu_count() or 1)
