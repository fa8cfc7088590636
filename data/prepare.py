"""`python -m data.prepare`: sources -> checked rows -> tokens (parallel, on disk) -> token-weighted mixture ->
packed shards, `stats.json` and a length histogram in `data.output_dir`; train on it with `data.path=<dir>`.

    python -m data.prepare data.output_dir=prepared/stdlib data.seq_len=4096 data.packing=best_fit
    python -m data.prepare data=prepare/mixture data.output_dir=prepared/mix data.num_proc=8
    python -m train data.path=prepared/stdlib data.seq_len=4096 data.packing=best_fit

Settings are the `data.*` keys of training (`configs/data/<name>.yaml`, chosen with `data=<name>`, default
`stdlib`; then `data.key=value` overrides, values in YAML syntax), plus those of `PrepareConfig`.

Steps, each streamed through files on disk (a corpus larger than memory never sits in memory whole):
1. Rows of every source are read and checked (`data.sources`): kept, dropped under a reason, or an error
   naming the file, row and field. Kept documents are written to an Arrow table on disk.
2. The validation split: per source, the documents whose name hashes below `VAL_FRACTION` (at least one
   when the source has two or more). It keeps the natural mix (no weights, no repeats).
3. The tokenizer (`data.tokenizer`, or SentencePiece trained on a sample of the training documents and
   cached) encodes every document with `datasets.map` (batched, `data.num_proc` processes); each
   document gets EOS, and BOS first when `data.add_bos` is set and the tokenizer has one.
4. The training mixture (`data.mixture`): per-source token budgets from the weights, length upsampling,
   repeats or subsampling, then one seeded shuffle of the chosen documents.
5. Each split's token stream goes to a memory-mapped file, then is packed (`data.packing`, see
   `data.layout`) shard by shard into `train/` and `val/`.

stats.json (train split at the top level, `val` beside it):
  documents, tokens          documents (copies counted) and tokens (BOS/EOS included) fed to packing
  sequences, fill_ratio      packed samples, and non-padding tokens / (sequences * seq_len)
  tokens_truncated           tokens left out by packing (only `pad` truncates: 0 for concat and best_fit)
  documents_longer_than_seq_len
  dropped                    {reason: rows} over all sources; `repaired` {undecodable_bytes: rows}
  sources                    per source: weight, target_share, token_share (realised, in tokens),
                             rows read / kept / dropped, tokens available and selected, repeats, and with
                             length_upsample the long-document token share before and after
"""

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cache import REPO_ROOT, atomic_directory, cache_key, default_cache_dir
from .corpus import VAL_FRACTION
from .layout import make_layout, write_layout
from .mixture import long_share, select_source, source_budgets
from .packing import SHARD_TOKENS, check_packing_args
from .prepared import FORMAT_VERSION, MANIFEST
from .sources import (
    DROP_REASONS,
    REPAIR_REASONS,
    Source,
    default_num_proc,
    parse_sources,
    read_rows,
    source_fingerprint,
)
from .tokenizer import TRAIN_CHARS, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CONFIG_DIR = REPO_ROOT / "configs" / "data"
ENCODE_BATCH = 512  # documents per datasets.map batch


@dataclass
class PrepareConfig:
    """The `data.*` settings `python -m data.prepare` reads (training's keys plus the ones below `cache_dir`)."""

    path: str | None = None  # one source: null = the stdlib corpus; a dir, .jsonl/.json/.parquet/.arrow, hub name
    sources: list[Any] | None = None  # several sources: [{path, weight, text_field, name, length_upsample}]
    tokenizer: str | None = None  # HF tokenizer dir or SentencePiece .model; null = SentencePiece trained + cached
    vocab_size: int = 8192  # vocabulary of a trained SentencePiece tokenizer
    seq_len: int = 1024  # tokens per packed sample
    packing: str = "concat"  # concat | pad | best_fit
    cache_dir: str | None = None  # where a trained tokenizer is cached; null = $MOBA_CACHE or <repo>/.cache/data
    output_dir: str | None = None  # the prepared directory to write (required; must not exist unless overwrite)
    text_field: str = "text"  # the text column of table sources (default of data.sources[].text_field)
    length_upsample: dict | None = None  # {min_tokens, share} for every source that sets none; null = off
    mix_tokens: int | None = None  # training tokens of the mixture; null = the most with no source repeated
    add_bos: bool = False  # put the tokenizer's BOS before every document (EOS always ends one)
    num_proc: int = 0  # tokenizer processes; 0 = every core
    seed: int = 0  # seed of the mixture's sampling and order
    overwrite: bool = False  # replace an existing prepared output_dir
    histogram: bool = True  # write lengths.png (matplotlib)

    def __post_init__(self):
        check_packing_args(self.seq_len, self.packing)
        if self.num_proc < 0:
            raise ValueError(f"data.num_proc={self.num_proc} must be >= 0 (0 = every core)")
        if self.mix_tokens is not None and self.mix_tokens < 1:
            raise ValueError(f"data.mix_tokens={self.mix_tokens} must be >= 1 (tokens) or null")


def compose(overrides: list[str]) -> PrepareConfig:
    """A `PrepareConfig` from command-line overrides: `data=<name>` picks `configs/data/<name>.yaml`
    (default stdlib), `data.key=value` sets a key (value parsed as YAML). Raises `ValueError` naming the
    argument for an unknown key, a bad value or a malformed argument."""
    group, pairs = "stdlib", []
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"argument {arg!r} must be data=<name> or data.<key>=<value>")
        if key == "data":
            group = value
        elif key.startswith("data."):
            pairs.append(f"{key[len('data.'):]}={value}")
        else:
            raise ValueError(f"argument {arg!r}: only data.* settings are read by python -m data.prepare")
    yaml = CONFIG_DIR / f"{group}.yaml"
    if not yaml.is_file():
        known = sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
        raise ValueError(f"data={group}: no {yaml} (known: {known})")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.load(yaml), OmegaConf.from_dotlist(pairs))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"data.{e.full_key}: {e.msg.splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------
# Steps


def _name_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _rows(sources: list[Source], indices: list[int]):
    for i in indices:
        for _, name, text, reason, repaired in read_rows(sources[i]):
            yield {"source": i, "name": name, "text": text, "drop": reason, "repaired": repaired,
                   "hash": _name_hash(f"{sources[i].name}/{name}")}


ROW_FEATURES = datasets.Features({"source": datasets.Value("int32"), "name": datasets.Value("string"),
                                  "text": datasets.Value("string"), "drop": datasets.Value("string"),
                                  "repaired": datasets.Value("bool"), "hash": datasets.Value("float64")})


def read_sources(sources: list[Source], work: Path, where=None) -> datasets.Dataset:
    """Every row of every source, checked (`read_rows`), as an Arrow table on disk (columns of ROW_FEATURES).
    Raises the readers' `ValueError` itself (not `datasets`' wrapper), and `ValueError` naming the source
    (`where(i)`, default `data.sources[i]`) when no source has a single row."""
    # datasets splits list-valued gen_kwargs into shards: one shard per source index, the sources as a tuple
    kwargs = {"sources": tuple(sources), "indices": list(range(len(sources)))}
    try:
        return datasets.Dataset.from_generator(_rows, features=ROW_FEATURES, cache_dir=str(work / "hf"),
                                               gen_kwargs=kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
    except ValueError as e:  # datasets: 'Instruction "train" corresponds to no data!'
        if "no data" not in str(e):
            raise
        where = where or (lambda i: f"data.sources[{i}] (path={sources[i].path})")
        raise ValueError(f"{where(0)} yields no document: 0 rows read") from None


def split_rows(source: np.ndarray, hashes: np.ndarray, num_sources: int) -> np.ndarray:
    """Bool (D,): True for the validation documents (module docstring, step 2). Per source: hash below
    `VAL_FRACTION`, else the lowest hash when the source has >= 2 documents, never all of them. When no
    source gives one, the first document serves both splits (returned as val, and kept in train)."""
    val = np.zeros(len(source), dtype=bool)
    for s in range(num_sources):
        idx = np.flatnonzero(source == s)
        if len(idx) < 2:
            continue
        mine = hashes[idx] < VAL_FRACTION
        if not mine.any() or mine.all():
            mine[:] = False
            mine[np.argmin(hashes[idx])] = True
        val[idx[mine]] = True
    return val


class _Encoder:
    """`datasets.map` function: texts -> {"ids": [BOS] + ids + [EOS], "length": len}. Picklable."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool):
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []

    def __call__(self, texts: list[str]) -> dict:
        ids = [self.prefix + x + [self.tokenizer.eos_id] for x in self.tokenizer.encode_batch(texts)]
        return {"ids": ids, "length": [len(x) for x in ids]}


def _sample_texts(docs: datasets.Dataset, positions: np.ndarray, seed: int) -> list[str]:
    """Texts of a seeded random sample of `positions`, about `TRAIN_CHARS` characters and a bit more."""
    order = np.random.default_rng(seed).permutation(positions)
    texts, chars = [], 0
    for start in range(0, len(order), 256):
        for text in docs.select(order[start : start + 256])["text"]:
            texts.append(text)
            chars += len(text)
        if chars >= 1.2 * TRAIN_CHARS:
            break
    return texts


def write_stream(encoded: datasets.Dataset, order: np.ndarray, lengths: np.ndarray, path: Path) -> np.ndarray:
    """Concatenate the token ids of rows `order` of `encoded` (repeats allowed) into an int32 memory-mapped
    `.npy` at `path`; returns the memory map (N,) with N = lengths[order].sum()."""
    total = int(lengths[order].sum())
    stream = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(max(total, 0),))
    pos = 0
    picked = encoded.select_columns(["ids"]).select(order).with_format("arrow")
    for batch in picked.iter(batch_size=4096):
        values = batch["ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        stream[pos : pos + len(values)] = values
        pos += len(values)
    assert pos == total, (pos, total)
    stream.flush()
    return stream


def pack_split(directory: Path, stream: np.ndarray, doc_lens: np.ndarray, cfg: PrepareConfig, pad_id: int,
               split: str) -> dict:
    """Pack one split's stream into `directory` (the `data.packing` layout with meta.json); returns its stats."""
    directory.mkdir(parents=True)
    layout = make_layout(doc_lens, cfg.seq_len, cfg.packing)
    shard_rows = write_layout(directory, stream, layout, cfg.seq_len, pad_id, SHARD_TOKENS, desc=f"packing {split}")
    packed = int(layout.piece_len.sum())
    meta = {"path": cfg.output_dir, "split": split, "packing": cfg.packing, "pad_id": pad_id, "seq_len": cfg.seq_len,
            "num_docs": len(doc_lens), "num_tokens": int(doc_lens.sum()), "num_samples": layout.num_rows,
            "shard_rows": shard_rows, "num_segments": len(layout.piece_len), "num_packed_tokens": packed}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"documents": len(doc_lens), "tokens": int(doc_lens.sum()), "sequences": layout.num_rows,
            "fill_ratio": packed / max(1, layout.num_rows * cfg.seq_len),
            "tokens_truncated": int(layout.tokens_truncated),
            "documents_longer_than_seq_len": int((doc_lens > cfg.seq_len).sum())}


def plot_lengths(path: Path, lengths_by_source: dict[str, np.ndarray], seq_len: int) -> None:
    """Histogram (log-spaced bins) of document lengths in tokens per source, with `seq_len` marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(int(max((x.max() for x in lengths_by_source.values() if len(x)), default=1)), seq_len) * 1.5
    bins = np.geomspace(1, top, 60)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, lengths in lengths_by_source.items():
        ax.hist(lengths, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(lengths)} docs)")
    ax.axvline(seq_len, color="black", linestyle="--", label=f"seq_len = {seq_len}")
    ax.set(xscale="log", xlabel="document length (tokens)", ylabel="documents",
           title="Document lengths against seq_len")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The command


def _where(i: int, sources: list[Source], cfg: PrepareConfig) -> str:
    return f"data.sources[{i}] (path={sources[i].path})" if cfg.sources is not None else f"data.path={cfg.path}"


def prepare(cfg: PrepareConfig) -> dict:
    """Write the prepared directory `cfg.output_dir` (module docstring); returns the stats written to
    stats.json. Raises `ValueError` naming the setting (e.g. `data.output_dir`, `data.sources[1].weight`),
    or the file, row and field of a row that cannot be used, or the source that yields no document."""
    start = time.perf_counter()
    if not cfg.output_dir:
        raise ValueError("data.output_dir=None: name the directory to write the prepared data into")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not (cfg.overwrite and (out / MANIFEST).is_file()):
            raise ValueError(f"data.output_dir={cfg.output_dir} exists and is not empty: choose another directory"
                             + (", or set data.overwrite=true to replace it" if (out / MANIFEST).is_file() else ""))
    sources = parse_sources(cfg.sources, cfg.path, cfg.text_field, cfg.length_upsample)
    weights = [s.weight for s in sources]
    num_proc = default_num_proc(cfg.num_proc)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_directory(staging) as tmp:
        work = tmp / "work"
        rows = read_sources(sources, work, lambda i: _where(i, sources, cfg))
        cols = rows.select_columns(["source", "drop", "repaired"]).with_format("numpy")[:]
        src_all, drop_all, repaired_all = cols["source"], cols["drop"].astype(str), cols["repaired"]
        per_source = []
        for i, s in enumerate(sources):
            mine = src_all == i
            dropped = {r: int(((drop_all == r) & mine).sum()) for r in DROP_REASONS}
            info = {"name": s.name, "path": s.path, "rows_read": int(mine.sum()),
                    "documents_kept": int((mine & (drop_all == "")).sum()),
                    "dropped": dropped, "repaired": {"undecodable_bytes": int((repaired_all & mine).sum())}}
            if info["documents_kept"] == 0:
                raise ValueError(f"{_where(i, sources, cfg)} yields no document: {info['rows_read']} rows read, "
                                 f"dropped {({k: v for k, v in dropped.items() if v})}")
            per_source.append(info)
        keep = np.flatnonzero(drop_all == "")
        docs = rows.select(keep)
        source = src_all[keep]
        is_val = split_rows(source, rows.select_columns(["hash"]).with_format("numpy")[:]["hash"][keep], len(sources))
        train_pos = np.flatnonzero(~is_val)
        val_pos = np.flatnonzero(is_val) if is_val.any() else train_pos[:1]

        corpus_id = cache_key("prepare", *[source_fingerprint(s) for s in sources])
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        tok = load_tokenizer(cfg.tokenizer, corpus_id=corpus_id, vocab_size=cfg.vocab_size, cache_dir=cache,
                             train_texts=lambda: _sample_texts(docs, train_pos, cfg.seed))
        encoded = docs.map(_Encoder(tok, cfg.add_bos), input_columns="text", batched=True, batch_size=ENCODE_BATCH,
                           remove_columns=docs.column_names, num_proc=num_proc if num_proc > 1 else None,
                           features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")),
                                                       "length": datasets.Value("int64")}),
                           desc="tokenizing")
        lengths = encoded.with_format("numpy")[:]["length"]

        # The training mixture, in tokens.
        rng = np.random.default_rng(cfg.seed)
        totals = [int(lengths[train_pos[source[train_pos] == i]].sum()) for i in range(len(sources))]
        for i, total in enumerate(totals):
            if total == 0:
                raise ValueError(f"{_where(i, sources, cfg)} has no training document (its only document is in the "
                                 "validation split): add documents or drop the source")
        budgets = source_budgets(totals, weights, cfg.mix_tokens)
        picked = []
        for i, s in enumerate(sources):
            pos = train_pos[source[train_pos] == i]
            setting = (f"data.sources[{i}].length_upsample" if cfg.sources is not None else "data.length_upsample")
            picked.append(pos[select_source(lengths[pos], budgets[i], s.length_upsample, rng, setting)])
        order = rng.permutation(np.concatenate(picked))
        mix_tokens = int(lengths[order].sum())
        for i, s in enumerate(sources):
            pos, chosen = train_pos[source[train_pos] == i], picked[i]
            info = per_source[i]
            info.update(weight=s.weight, target_share=s.weight / sum(weights),
                        token_share=float(lengths[chosen].sum() / mix_tokens),
                        train_documents=len(pos), val_documents=int((source[val_pos] == i).sum()),
                        tokens_available=totals[i], tokens_selected=int(lengths[chosen].sum()),
                        documents_selected=len(chosen), repeats=float(lengths[chosen].sum() / totals[i]))
            if s.length_upsample is not None:
                up = s.length_upsample
                info["length_upsample"] = {"min_tokens": up.min_tokens, "target_share": up.share,
                                           "long_share_before": long_share(lengths[pos], up.min_tokens),
                                           "long_share_after": long_share(lengths[chosen], up.min_tokens)}

        stats = {"seq_len": cfg.seq_len, "packing": cfg.packing, "tokenizer": tok.name, "vocab_size": tok.vocab_size}
        for split, positions in (("train", order), ("val", val_pos)):
            stream = write_stream(encoded, positions, lengths, work / f"{split}-stream.npy")
            split_stats = pack_split(tmp / split, stream, lengths[positions], cfg, tok.pad_id, split)
            del stream
            if split == "train":
                stats.update(split_stats)
            else:
                stats["val"] = split_stats
        stats["dropped"] = {r: sum(p["dropped"][r] for p in per_source) for r in DROP_REASONS}
        stats["repaired"] = {r: sum(p["repaired"][r] for p in per_source) for r in REPAIR_REASONS}
        stats["sources"] = per_source
        stats["seconds"] = round(time.perf_counter() - start, 1)

        if cfg.histogram:
            plot_lengths(tmp / "lengths.png", {s.name: lengths[source == i] for i, s in enumerate(sources)},
                         cfg.seq_len)
        tok.save(tmp / "tokenizer")
        shutil.rmtree(work)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        manifest = {"format": FORMAT_VERSION, "seq_len": cfg.seq_len, "packing": cfg.packing, "pad_id": tok.pad_id,
                    "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size,
                    "sources": [dict(asdict(s), fingerprint=source_fingerprint(s)) for s in sources],
                    "settings": asdict(cfg)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return stats


def summary(stats: dict) -> str:
    """Human-readable lines: totals, drops, and each source's target vs realised token share."""
    lines = [f"{stats['documents']} documents, {stats['tokens']} tokens -> {stats['sequences']} sequences of "
             f"{stats['seq_len']} ({stats['packing']}, fill {stats['fill_ratio']:.4f}, "
             f"{stats['tokens_truncated']} tokens truncated); val: {stats['val']['sequences']} sequences",
             f"dropped: {stats['dropped']}  repaired: {stats['repaired']}",
             f"{'source':<24}{'weight':>8}{'target':>9}{'realised':>10}{'tokens':>14}{'repeats':>9}"]
    for s in stats["sources"]:
        lines.append(f"{s['name'][:23]:<24}{s['weight']:>8g}{s['target_share']:>9.4f}{s['token_share']:>10.4f}"
                     f"{s['tokens_selected']:>14}{s['repeats']:>9.3f}")
        if "length_upsample" in s:
            u = s["length_upsample"]
            lines.append(f"{'':<24}long docs (> {u['min_tokens']} tokens): {u['long_share_before']:.4f} of tokens "
                         f"-> {u['long_share_after']:.4f} (target {u['target_share']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data.prepare [data=<name>] [data.key=value ...]`; returns the exit code
    (2 with one line on stderr for a bad setting or bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = compose(argv)
        stats = prepare(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(stats))
    print(f"wrote {cfg.output_dir} (stats.json, lengths.png, train/, val/, tokenizer/) in {stats['seconds']} s; "
          f"train on it with: python -m train data.path={cfg.output_dir} data.seq_len={cfg.seq_len} "
          f"data.packing={cfg.packing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
