"""Documents to train on, as a HF `datasets.Dataset` with the columns `name` (str) and `text` (str).

Sources (`data.path`):
- `None` (the embedded default): the Python standard library's own source, which every machine has.
  One document per module (`.py` file) under `sysconfig.get_paths()["stdlib"]`, `site-packages` and
  `dist-packages` skipped, in sorted path order; `name` is the path relative to the stdlib directory.
- a directory: every `*.txt`, `*.py`, `*.md` file below it (hidden folders skipped), one document per
  file, sorted by relative path, which is the `name`.
- a `.jsonl` / `.json` / `.parquet` file with a `text` column, read by `datasets.load_dataset`; `name`
  is taken from a `name` or `id` column when there is one, else `<file name>#<row>`.

`data.documents` (`documents=`): `module` (the default) keeps one document per file as above; `package`
makes one document per top-level entry of the stdlib or the directory: the files of a package (folder),
concatenated in sorted path order, each preceded by a line naming it (`FILE_HEADER`), like the
repository-level documents of long-context code data; a top-level file stays a document of its own. The
stdlib then holds documents of 10^5-10^6 tokens. A directory with a single top-level entry (one document:
train and validation would be the same text) is refused, naming the folder to use as `data.path` instead.

Files are decoded as UTF-8 with undecodable bytes replaced. Documents whose text is only whitespace
are dropped. The validation split holds the documents whose name hashes below `VAL_FRACTION` (about 2%
of them, at least one): it depends only on the names, so it is the same on every machine and run.
"""

import hashlib
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path

import datasets

from .prepared import is_prepared, prepared_fingerprint

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "val")
VAL_FRACTION = 0.02
DOCUMENT_MODES = ("module", "package")
FILE_HEADER = "# ==== file: {name} ====\n"  # opens each file inside a package-level document
CORPUS_VERSION = 1  # bump when the way documents are read changes, so cached results are rebuilt


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    files = (p for p in root.rglob("*.py") if skipped.isdisjoint(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(root: Path) -> list[Path]:
    files = (
        p
        for p in root.rglob("*")
        if p.suffix in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path={path} does not exist")
    if p.is_file() and p.suffix not in TABLE_SUFFIXES:
        raise ValueError(
            f"data.path={path}: a file must end in {', '.join(TABLE_SUFFIXES)} (or give a directory of "
            f"{', '.join('*' + s for s in TEXT_SUFFIXES)} files)"
        )
    return p


def corpus_fingerprint(path: str | os.PathLike | None = None) -> str:
    """A cheap identity of the corpus at `path` (`None` = stdlib): names, sizes and mtimes of its files.

    Returns a hex string; it changes when a file is added, removed or modified. Does not read file
    contents. A directory written by `python -m data.prepare` is identified by its manifest instead.
    Raises `ValueError` (naming `data.path`) when `path` does not exist or has a bad suffix.
    """
    if is_prepared(path):
        return prepared_fingerprint(path)
    if path is None:
        root, files, source = stdlib_dir(), _stdlib_files(), ["stdlib", sys.version]
    else:
        p = _check_path(path)
        root, files, source = (p, _text_files(p), ["dir"]) if p.is_dir() else (p.parent, [p], ["file"])
        source.append(str(p.resolve()))
    h = hashlib.sha256(json.dumps([CORPUS_VERSION, *source, str(root)]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_files(root: Path, files: list[Path]) -> datasets.Dataset:
    names = [f.relative_to(root).as_posix() for f in files]
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    return datasets.Dataset.from_dict({"name": names, "text": texts})


def _table_error(path: Path, cause: Exception | None) -> ValueError:
    """The error for a table file that `datasets` could not read as text rows: the first bad row as `python -m
    data.prepare`'s row checks name it (`sources.read_rows`: file, line, field), else the reader's own error."""
    from .sources import TEXT_FIELD_HINT, Source, read_rows  # sources imports this module

    try:
        for _ in read_rows(Source(path=str(path))):  # raises ValueError at the first row it cannot take
            pass
    except ValueError as e:  # "<file> line 7 field 'text': ..." -> "data.path=<file>: line 7 field 'text': ..."
        msg = str(e).removeprefix(f"{path} ")
        if msg.endswith(TEXT_FIELD_HINT):  # data.path reads the "text" field; data.prepare takes another one
            msg = msg.removesuffix(TEXT_FIELD_HINT) + (" (a table's text is read from its 'text' field; python -m "
                                                       "data.prepare data.text_field=<column> converts a table with "
                                                       "another one)")
        return ValueError(f"data.path={path}: {msg}")
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ValueError(f"data.path={path}: cannot be read as a {path.suffix[1:]} table of text rows{detail}")


def _read_table(path: Path, cache_dir: Path | None) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(
            TABLE_SUFFIXES[path.suffix],
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir / "hf") if cache_dir else None,
        )
    except Exception as e:  # pyarrow / datasets raise ArrowInvalid, DatasetGenerationError, ... for a bad row
        raise _table_error(path, e) from e
    if "text" not in ds.column_names:
        raise ValueError(f"data.path={path} has no 'text' column (columns: {ds.column_names})")
    if getattr(ds.features["text"], "dtype", None) not in ("string", "large_string", "null"):
        raise _table_error(path, None)  # e.g. numbers in every row's text field
    id_column = next((c for c in ("name", "id") if c in ds.column_names), None)
    names = [str(x) for x in ds[id_column]] if id_column else [f"{path.name}#{i}" for i in range(len(ds))]
    return datasets.Dataset.from_dict({"name": names, "text": [t or "" for t in ds["text"]]})


def check_documents(documents: str, path: str | os.PathLike | None, key: str = "data.documents",
                    path_key: str = "data.path", fix: str | None = None) -> None:
    """Refuse a `documents` mode that is not one of `DOCUMENT_MODES`, or `package` for a corpus that has no
    folders to group by: a table file (its rows) or a prepared directory (whose documents `python -m
    data.prepare` fixed; they would be read as they are, silently).

    `key` and `path_key` name where `documents` and `path` come from (`data.documents` / `data.path`, or
    `eval.documents` / `eval.data_path`, or "the run's data.path"); `fix` is the override that changes the
    mode (default `key`). Raises `ValueError` naming `key`, `path_key` and their values.
    """
    fix = fix or key
    if documents not in DOCUMENT_MODES:
        raise ValueError(f"{key}={documents!r} must be one of {', '.join(DOCUMENT_MODES)}")
    if documents != "package" or path is None:
        return
    kind = ("a prepared directory, whose documents python -m data.prepare fixed" if is_prepared(path) else
            "a table file" if Path(path).expanduser().is_file() else None)
    if kind is not None:
        raise ValueError(f"{key}=package groups the files of a directory (or the stdlib) by top-level folder; "
                         f"{path_key}={path} is {kind}: use {fix}=module")


def group_by_package(ds: datasets.Dataset) -> datasets.Dataset:
    """One document per top-level entry of `ds`'s names (relative paths, sorted): a folder's files joined in
    order, each opened by `FILE_HEADER`; whitespace-only files are left out. `name` is the entry's name."""
    groups: dict[str, list[str]] = {}
    for name, text in zip(ds["name"], ds["text"]):
        if text.strip():
            groups.setdefault(name.split("/", 1)[0], []).append(FILE_HEADER.format(name=name) + text.rstrip("\n"))
    return datasets.Dataset.from_dict({"name": list(groups), "text": ["\n".join(g) + "\n" for g in groups.values()]})


def load_corpus(path: str | os.PathLike | None = None, cache_dir: Path | None = None,
                documents: str = "module") -> datasets.Dataset:
    """Load every document of the corpus at `path` (`None` = the Python stdlib sources).

    Returns a `datasets.Dataset` with columns `name` (str) and `text` (str), in a deterministic order,
    whitespace-only documents dropped; `documents="package"` groups files by top-level folder (see the module
    docstring). `cache_dir` (optional) hosts `datasets`' own cache for table files.
    Raises `ValueError` naming `data.path` and its value when the path does not exist, has an unsupported
    suffix, lacks a `text` column, or yields no documents, naming `data.documents` as `check_documents`, and
    when `documents="package"` makes a single document (`check_package_count`).
    """
    check_documents(documents, path)
    if path is None:
        ds = _read_files(stdlib_dir(), _stdlib_files())
    else:
        p = _check_path(path)
        ds = _read_files(p, _text_files(p)) if p.is_dir() else _read_table(p, cache_dir)
    if documents == "package":
        ds = group_by_package(ds)
    keep = [i for i, text in enumerate(ds["text"]) if text.strip()]
    if not keep:
        hint = "" if path is None or Path(path).is_file() else f" (looked for *{', *'.join(TEXT_SUFFIXES)})"
        raise ValueError(f"data.path={path} yields no documents{hint}")
    if len(keep) < len(ds):
        logger.info("corpus: dropped %d empty documents", len(ds) - len(keep))
        ds = ds.select(keep)
    if documents == "package" and len(ds) == 1:
        check_package_count(path, ds["name"][0])
    return ds


def check_package_count(path: str | os.PathLike, entry: str) -> None:
    """Refuse a package-level corpus of one document (the directory `path` has one top-level entry `entry` with
    text): its train and validation splits would be the same text, so the validation loss would measure
    memorisation. Raises `ValueError` naming `data.documents`, `data.path`, `entry` and what to set instead."""
    folder = Path(path) / entry
    fix = (f"set data.path={folder} to make each entry of that folder a document, or use data.documents=module"
           if folder.is_dir() else "add documents, or point data.path at a directory with more")
    raise ValueError(f"data.documents=package: data.path={path} holds one top-level entry ({entry}), so the corpus "
                     f"is one document and the train and validation splits would be the same text; {fix}")


def _name_hash(name: str) -> float:
    """A number in [0, 1) fixed by the document name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_indices(names: list[str], split: str) -> list[int]:
    """Indices (ascending) of the documents named `names` that belong to `split` ("train" or "val").

    "val" holds the documents with `_name_hash(name) < VAL_FRACTION`, or the single lowest-hash one when
    none falls below; "train" holds the rest. With a single document both splits are that document (a
    warning is logged). Raises `ValueError` for another `split`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if len(names) == 1:
        logger.warning("corpus has a single document: train and val splits both use it")
        return [0]
    hashes = [_name_hash(n) for n in names]
    lowest = {min(range(len(names)), key=hashes.__getitem__)}
    val = {i for i, h in enumerate(hashes) if h < VAL_FRACTION} or lowest
    if len(val) == len(names):  # a tiny corpus keeps at least one training document
        val = lowest
    return [i for i in range(len(names)) if (i in val) == (split == "val")]


def split_corpus(corpus: datasets.Dataset, split: str) -> datasets.Dataset:
    """The documents of `corpus` (columns `name`, `text`) in `split` ("train" or "val"), order kept."""
    return corpus.select(split_indices(corpus["name"], split))
