"""A run keeps the corpus and tokenizer it started with: its tokenizer is stored in the run dir and a
resume after the corpus was edited is refused, naming the corpus."""

import hashlib
import shutil

from train.data_identity import saved_identity, tokenizer_spec

from .conftest import read_metrics, run_train


def test_resume_after_corpus_edit_is_refused_and_the_run_keeps_its_tokenizer(tmp_path, small_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus[0], corpus)
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    common = [f"data.path={corpus}", f"data.cache_dir={cache}", "checkpoint.every=1"]
    run_train([*common, "train.max_steps=1"], run_dir, cache)

    # The tokenizer the run trained is stored with the run, and its checkpoint records where.
    trained = list((cache / "tokenizer").glob("spm-*.model"))
    assert len(trained) == 1
    stored = run_dir / "tokenizer" / "tokenizer.model"
    assert stored.read_bytes() == trained[0].read_bytes()
    saved = saved_identity(run_dir / "checkpoints", "step_00000001")
    assert saved["tokenizer"] == "spm-" + hashlib.sha256(stored.read_bytes()).hexdigest()[:16]
    assert tokenizer_spec(None, None, saved) == str(stored.resolve())  # what a resume loads

    # One comment line added to one file of the corpus: the resume stops and names the corpus.
    doc = corpus / "doc03.txt"
    doc.write_text(doc.read_text() + "# a comment\n")
    proc = run_train([*common, "train.max_steps=2", "resume=auto"], run_dir, cache, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"data.path='{corpus}' changed since this run started" in out
    assert list((cache / "tokenizer").glob("spm-*.model")) == trained  # no tokenizer trained on the edit
    assert [m["step"] for m in read_metrics(run_dir)] == [1]
