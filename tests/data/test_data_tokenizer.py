"""The tokenizer: round trips, the trained model's cache, HF tokenizer directories, errors naming settings."""

import os

import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import data.tokenizer
from data import build_data, corpus_fingerprint, load_tokenizer, tokenizer_in

TRICKY = [
    "",
    "plain words",
    "  leading spaces\n\ttabs\r\nand CRLF  ",
    "def f(x):\n        return x ** 2  # indented\n",
    "unicode: ü 東京 🎉 \u200b and bytes never seen in training: \x00\x07 ☃",
]


@pytest.mark.parametrize("text", [pytest.param(t, id=f"text{i}") for i, t in enumerate(TRICKY)])
def test_round_trip(build_tiny, text):
    _, tok = build_tiny()
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_batch_and_special_ids(build_tiny):
    _, tok = build_tiny()
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)
    assert 300 < tok.vocab_size <= 1024  # the tiny corpus cannot fill the requested vocabulary


def test_trained_model_is_cached_and_reused(tiny_corpus, tmp_path, monkeypatch):
    calls = []
    train = data.tokenizer.train_sentencepiece
    monkeypatch.setattr(data.tokenizer, "train_sentencepiece", lambda *a: calls.append(1) or train(*a))
    _, first = build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)
    (model,) = (tmp_path / "tokenizer").iterdir()
    mtime = model.stat().st_mtime_ns
    _, second = build_data(tiny_corpus, vocab_size=1024, seq_len=32, split="val", cache_dir=tmp_path)
    assert calls == [1] and model.stat().st_mtime_ns == mtime
    assert second.fingerprint == first.fingerprint
    assert not [p for p in (tmp_path / "tokenizer").iterdir() if p.name.startswith(".")]  # no temp files
    build_data(tiny_corpus, vocab_size=800, seq_len=16, cache_dir=tmp_path)  # another vocab: a new model
    assert calls == [1, 1] and len(list((tmp_path / "tokenizer").iterdir())) == 2


def test_log_names_the_vocabulary_the_model_has(tiny_corpus, tmp_path, caplog):
    """The tiny corpus cannot fill data.vocab_size=1024: the log says the trained size, not 1024."""
    with caplog.at_level("INFO", logger="data.tokenizer"):
        _, tok = build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)
        build_data(tiny_corpus, vocab_size=1024, seq_len=16, split="val", cache_dir=tmp_path)
    assert tok.vocab_size < 1024
    assert f"trained SentencePiece (vocab {tok.vocab_size}, data.vocab_size=1024)" in caplog.text
    assert f"(vocab {tok.vocab_size})" in caplog.text and "vocab 1024" not in caplog.text


def test_failed_training_leaves_no_model(tiny_corpus, tmp_path, monkeypatch):
    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.tokenizer, "train_sentencepiece", boom)
    with pytest.raises(KeyboardInterrupt):
        build_data(tiny_corpus, vocab_size=1024, seq_len=16, cache_dir=tmp_path)
    assert not (tmp_path / "tokenizer").exists() or not list((tmp_path / "tokenizer").iterdir())


def test_sentencepiece_model_file_as_tokenizer(build_tiny, session_cache, tiny_corpus):
    _, trained = build_tiny()
    (model,) = (session_cache / "tokenizer").glob("*.model")
    tok = load_tokenizer(model, corpus_id="unused", train_texts=None, cache_dir=session_cache)
    assert tok.fingerprint == trained.fingerprint
    assert tok.encode(TRICKY[3]) == trained.encode(TRICKY[3])


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the value of a block", "return self.data"] * 20, trainer)
    directory = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(str(directory))
    return directory


def test_hf_tokenizer_directory(tiny_corpus, tmp_path, hf_tokenizer_dir, document_tokens):
    ds, tok = build_data(tiny_corpus, tokenizer=hf_tokenizer_dir, seq_len=32, cache_dir=tmp_path / "cache")
    assert tok.eos_id == 0 and tok.bos_id is None and tok.pad_id == 0
    assert tok.decode(tok.encode("return self.value")) == "return self.value"
    assert not (tmp_path / "cache" / "tokenizer").exists()  # nothing trained
    docs = document_tokens(tiny_corpus, tok, "train")
    assert ds[0]["input_ids"].tolist() == [t for d in docs for t in d][:32]


@pytest.mark.parametrize("kind", ["empty-dir", "missing"])
def test_bad_tokenizer_names_the_setting(tiny_corpus, tmp_path, kind):
    spec = tmp_path / "tok"
    if kind == "empty-dir":
        spec.mkdir()
    with pytest.raises(ValueError, match=f"data.tokenizer={spec}"):
        build_data(tiny_corpus, tokenizer=spec, seq_len=16, cache_dir=tmp_path / "cache")


def test_small_vocab_names_the_setting(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="data.vocab_size=100"):
        build_data(tiny_corpus, vocab_size=100, seq_len=16, cache_dir=tmp_path)


def test_corpus_fingerprint_is_part_of_the_model_key(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    before = corpus_fingerprint(tmp_path)
    _, tok = build_data(tmp_path, vocab_size=512, seq_len=8, cache_dir=tmp_path / ".cache")
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert corpus_fingerprint(tmp_path) != before
    build_data(tmp_path, vocab_size=512, seq_len=8, cache_dir=tmp_path / ".cache")
    assert len(list((tmp_path / ".cache" / "tokenizer").iterdir())) == 2


def test_saved_tokenizers_are_found_in_a_model_dir(build_tiny, tiny_corpus, tmp_path, hf_tokenizer_dir):
    """`Tokenizer.save` into an exported model dir, `tokenizer_in` finds it, and it loads as the same vocab."""
    assert tokenizer_in(tmp_path / "nothing") is None and tokenizer_in(None) is None
    _, trained = build_tiny()
    spm_dir = tmp_path / "spm_model"
    trained.save(spm_dir)
    spec = tokenizer_in(spm_dir)
    assert spec == str(spm_dir / "tokenizer.model")
    assert load_tokenizer(spec, corpus_id="x", train_texts=None, cache_dir=tmp_path).fingerprint == trained.fingerprint
    hf = load_tokenizer(hf_tokenizer_dir, corpus_id="x", train_texts=None, cache_dir=tmp_path)
    hf.save(tmp_path / "hf_model")
    again = load_tokenizer(tokenizer_in(tmp_path / "hf_model"), corpus_id="x", train_texts=None, cache_dir=tmp_path)
    assert again.encode("return self.value") == hf.encode("return self.value")
