"""`python -m data.prepare` end to end on tiny corpora: tokens in = tokens out + truncated, weights realised in
tokens, length upsampling, training reads the directory (and resumes mid-epoch), the command line, errors."""

import collections
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from data import build_data, build_dataloader, corpus_fingerprint
from data.prepare import PrepareConfig, compose, main, prepare
from data.sources import parse_sources, read_rows
from data.tokenizer import SentencePieceTokenizer
from data.train_tokenizer import main as train_tokenizer_main


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, word_text):
    """web.jsonl: 300 short documents; books.jsonl: 40 longer ones (some far longer than 64 tokens)."""
    root = tmp_path_factory.mktemp("two_sources")
    web, books = root / "web.jsonl", root / "books.jsonl"
    web.write_text("".join(json.dumps({"id": f"w{i}", "text": word_text(i, 10 + i % 30)}) + "\n" for i in range(300)))
    books.write_text("".join(json.dumps({"text": word_text(1000 + i, 40 + 25 * (i % 12))}) + "\n" for i in range(40)))
    return web, books


def settings(tmp_path, tiny_spm, name="out", **kw):
    kw.setdefault("seq_len", 64)
    return PrepareConfig(tokenizer=str(tiny_spm), output_dir=str(tmp_path / name), num_proc=1, histogram=False,
                         cache_dir=str(tmp_path / "cache"), **kw)


def encoded_documents(path, tokenizer, bos=False):
    """Every kept document of a source, encoded here one by one, + EOS (and BOS first)."""
    out = []
    for _, _, text, reason, _ in read_rows(parse_sources(None, str(path))[0]):
        if not reason:
            out.append(([tokenizer.bos_id] if bos else []) + tokenizer.encode(text) + [tokenizer.eos_id])
    return out


@pytest.mark.parametrize("packing", ["concat", "best_fit", "pad"])
def test_no_token_lost_or_duplicated(tmp_path, tiny_spm, two_sources, packing):
    web, _ = two_sources
    stats = prepare(settings(tmp_path, tiny_spm, path=str(web), packing=packing, seq_len=32))
    tok = SentencePieceTokenizer(tiny_spm)
    docs = encoded_documents(web, tok)
    expected = collections.Counter(t for d in docs for t in d)
    got = collections.Counter()
    out_tokens = 0
    for split in ("train", "val"):
        ds, _ = build_data(tmp_path / "out", split=split, seq_len=32, packing=packing)
        for i in range(len(ds)):
            n = int(np.load(tmp_path / "out" / split / "num_valid.npy")[i])
            ids = ds[i]["input_ids"][:n].tolist()
            got.update(ids)
            out_tokens += n
    total_in = sum(len(d) for d in docs)
    assert stats["tokens"] + stats["val"]["tokens"] == total_in  # every document once: one source, no weights
    truncated = stats["tokens_truncated"] + stats["val"]["tokens_truncated"]
    assert total_in == out_tokens + truncated
    if packing == "pad":
        assert truncated == sum(max(0, len(d) - 32) for d in docs) > 0
    else:
        assert truncated == 0 and got == expected
    assert stats["sequences"] == len(build_data(tmp_path / "out", seq_len=32, packing=packing)[0])
    packed = stats["tokens"] - stats["tokens_truncated"]
    assert stats["fill_ratio"] == pytest.approx(packed / (stats["sequences"] * 32))


def test_best_fit_fills_at_least_as_well_as_pad(tmp_path, tiny_spm, two_sources):
    web, _ = two_sources
    fill = {p: prepare(settings(tmp_path, tiny_spm, name=p, path=str(web), packing=p, seq_len=64))["fill_ratio"]
            for p in ("pad", "best_fit", "concat")}
    assert fill["pad"] <= fill["best_fit"] <= fill["concat"]
    assert fill["best_fit"] > 0.9


def source_shares_in_tokens(directory, docs_by_source):
    """Token share per source, recomputed from the packed rows (pad packing, seq_len above every document:
    each row is one whole document, looked up among each source's independently encoded documents)."""
    owner = {tuple(d): s for s, docs in enumerate(docs_by_source) for d in docs}
    counts = np.zeros(len(docs_by_source))
    ds, _ = build_data(directory, seq_len=1024, packing="pad")
    for i in range(len(ds)):
        n = int(ds[i]["cu_seqlens"][1])
        counts[owner[tuple(ds[i]["input_ids"][:n].tolist())]] += n
    return counts / counts.sum()


def test_weights_and_upsampling_realised_in_tokens(tmp_path, tiny_spm, two_sources):
    web, books = two_sources
    up = {"min_tokens": 330, "share": 0.6}
    cfg = settings(tmp_path, tiny_spm, seq_len=1024, packing="pad", mix_tokens=150_000,
                   sources=[{"path": str(web), "weight": 0.7}, {"path": str(books), "weight": 0.3, "name": "books",
                                                                 "length_upsample": up}])
    stats = prepare(cfg)
    tok = SentencePieceTokenizer(tiny_spm)
    docs = [encoded_documents(web, tok), encoded_documents(books, tok)]
    shares = source_shares_in_tokens(tmp_path / "out", docs)
    np.testing.assert_allclose(shares, [0.7, 0.3], rtol=0.01)
    np.testing.assert_allclose([s["token_share"] for s in stats["sources"]], shares, rtol=1e-9)
    assert abs(stats["tokens"] - 150_000) / 150_000 < 0.01
    book = stats["sources"][1]
    assert book["name"] == "books" and book["repeats"] > 1
    lengths = np.array([len(d) for d in docs[1]])
    assert book["length_upsample"]["long_share_before"] < 0.5
    assert abs(book["length_upsample"]["long_share_after"] - 0.6) < 0.01
    assert (lengths > 330).any() and (lengths <= 330).any() and lengths.max() < 1024


def test_training_reads_it_and_resumes_mid_epoch(tmp_path, tiny_spm, two_sources):
    web, books = two_sources
    prepare(settings(tmp_path, tiny_spm, packing="best_fit", seq_len=32, mix_tokens=20_000,
                     sources=[{"path": str(web), "weight": 1}, {"path": str(books), "weight": 1}]))
    out = tmp_path / "out"
    ds, tok = build_data(out, seq_len=32, packing="best_fit")
    assert tok.fingerprint == SentencePieceTokenizer(tiny_spm).fingerprint
    val, _ = build_data(out, split="val", seq_len=32, packing="best_fit", tokenizer=str(tiny_spm))
    assert len(val) >= 1 and len(ds) > 20
    uninterrupted = list(itertools.islice(build_dataloader(ds, micro_batch_size=2, seed=3, dp_size=2), 30))
    first = build_dataloader(ds, micro_batch_size=2, seed=3, dp_size=2)
    for _ in itertools.islice(first, 17):  # past the first epoch's middle, into the next epoch
        pass
    resumed = build_dataloader(ds, micro_batch_size=2, seed=3, dp_size=2)
    resumed.sampler.load_state_dict(first.sampler.state_dict())
    for want, got in zip(uninterrupted[17:], itertools.islice(resumed, 13)):
        assert all(torch.equal(torch.as_tensor(want[k]), torch.as_tensor(got[k])) for k in want)
    batch = uninterrupted[0]
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 64
    for a, b in zip(cu[:-1], cu[1:]):  # positions restart at every document
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))


def test_prepared_directory_errors(tmp_path, tiny_spm, two_sources, word_text):
    web, _ = two_sources
    prepare(settings(tmp_path, tiny_spm, path=str(web), packing="best_fit"))
    out = tmp_path / "out"
    before = corpus_fingerprint(out)
    with pytest.raises(ValueError, match=r"data.seq_len=128 differs from data.path=.*seq_len=64"):
        build_data(out, seq_len=128, packing="best_fit")
    with pytest.raises(ValueError, match=r"data.packing='concat' differs from data.path=.*packing='best_fit'"):
        build_data(out, seq_len=64, packing="concat")
    from data.tokenizer import train_sentencepiece

    other = tmp_path / "other.model"
    other.write_bytes(train_sentencepiece([word_text(5, 2000)], 520))
    with pytest.raises(ValueError, match=r"data.tokenizer=.*other.model is not the tokenizer data.path="):
        build_data(out, seq_len=64, packing="best_fit", tokenizer=str(other))
    with pytest.raises(ValueError, match=r"data.output_dir=.* exists and is not empty.*data.overwrite=true"):
        prepare(settings(tmp_path, tiny_spm, path=str(web), packing="best_fit"))
    prepare(settings(tmp_path, tiny_spm, path=str(web), packing="best_fit", seq_len=48, overwrite=True))
    assert corpus_fingerprint(out) != before  # a run resumed on a re-prepared directory is refused


def test_bos_and_parallel_tokenization_give_the_same_shards(tmp_path, tiny_spm, two_sources):
    web, _ = two_sources
    one = prepare(settings(tmp_path, tiny_spm, name="one", path=str(web), add_bos=True))
    two = prepare(replace(settings(tmp_path, tiny_spm, name="two", path=str(web), add_bos=True), num_proc=2))
    assert {k: v for k, v in one.items() if k != "seconds"} == {k: v for k, v in two.items() if k != "seconds"}
    for split in ("train", "val"):
        for f in sorted((tmp_path / "one" / split).glob("*.npy")):
            np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "two" / split / f.name))
    ds, tok = build_data(tmp_path / "one", seq_len=64, packing="concat")
    starts = [int(c) for i in range(len(ds)) for c in ds[i]["cu_seqlens"][:-1]]
    assert tok.bos_id == 1 and ds[0]["input_ids"][0] == tok.bos_id and starts


def test_command_line(tmp_path, tiny_spm, two_sources, capsys):
    web, books = two_sources
    out = tmp_path / "cli"
    code = main([f"data.sources=[{{path: {web}, weight: 2}}, {{path: {books}, weight: 1}}]", f"data.output_dir={out}",
                 f"data.tokenizer={tiny_spm}", "data.seq_len=64", "data.packing=best_fit", "data.num_proc=1",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert code == 0 and "web.jsonl" in printed and "python -m train data.path=" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats) >= {"documents", "tokens", "sequences", "fill_ratio", "tokens_truncated", "dropped", "sources"}
    assert [s["target_share"] for s in stats["sources"]] == pytest.approx([2 / 3, 1 / 3])
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["data.output_dir=x", "data.packing=greedy"]) == 2
    assert "data.packing='greedy' must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data.bogus"):
        compose(["data.bogus=1"])
    with pytest.raises(ValueError, match="only data.\\* settings"):
        compose(["seq_len=3"])
    assert compose(["data=stdlib", "data.seq_len=128"]).seq_len == 128
    # values are YAML: {path:x} without a space is one key "path:x" (data.sources then names the fix)
    assert compose(["data.sources=[{path: /a/x.jsonl, weight: 2}, {path: null}]"]).sources == \
        [{"path": "/a/x.jsonl", "weight": 2}, {"path": None}]
    assert compose(["data.sources=[{path:/a/x.jsonl,weight:2}]"]).sources == \
        [{"path:/a/x.jsonl": None, "weight:2": None}]


def test_train_tokenizer_command(tmp_path, two_sources, capsys):
    web, _ = two_sources
    assert train_tokenizer_main([f"data.path={web}", "data.vocab_size=520", f"data.output_dir={tmp_path}"]) == 0
    tok = SentencePieceTokenizer(tmp_path / "tokenizer.model")
    assert tok.vocab_size <= 520 and tok.eos_id == 2 and tok.decode(tok.encode("self value 42")) == "self value 42"
    assert train_tokenizer_main([f"data.path={web}", "data.vocab_size=100", f"data.output_dir={tmp_path}"]) == 2
    assert "data.vocab_size=100" in capsys.readouterr().err


def test_hf_tokenizer_in_parallel_and_read_back(tmp_path, two_sources):
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the value of a block", "return self.data"] * 20, trainer)
    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(str(hf_dir))
    web, _ = two_sources
    cfg = PrepareConfig(path=str(web), tokenizer=str(hf_dir), seq_len=64, packing="best_fit", num_proc=2,
                        add_bos=True, output_dir=str(tmp_path / "out"), histogram=False)
    stats = prepare(cfg)
    stored_ds, stored = build_data(tmp_path / "out", seq_len=64, packing="best_fit")
    given_ds, given = build_data(tmp_path / "out", seq_len=64, packing="best_fit", tokenizer=str(hf_dir))
    assert stored.vocab_size == given.vocab_size and stored.encode("return self.x") == given.encode("return self.x")
    docs = encoded_documents(web, given)  # no BOS: this tokenizer has none
    assert stats["tokens"] + stats["val"]["tokens"] == sum(len(d) for d in docs)
    assert torch.equal(stored_ds[0]["input_ids"], given_ds[0]["input_ids"])
