"""Continuing from an HF checkpoint: its fields (RoPE base) are kept unless given on the command line, and
a checkpoint without a tokenizer is refused unless ``data.tokenizer`` names one."""

import json
import shutil

from transformers import AutoConfig

from train.data_identity import tokenizer_spec

from .conftest import read_metrics, run_train, small_data_args


def test_checkpoint_rope_theta_survives_training_and_export(tmp_path, small_corpus, init_checkpoint):
    """The default model group sets ``rope_theta: 10000.0``; a checkpoint with 500000 keeps 500000 through
    training and export, and the run's config says the value comes from the checkpoint (null)."""
    run_dir = tmp_path / "run"
    run_train([*small_data_args(small_corpus), f"model.name_or_path={init_checkpoint}", "train.max_steps=1",
               "checkpoint.export_hf=true", "data.packing=pad"], run_dir, small_corpus[1])
    exported = AutoConfig.from_pretrained(run_dir / "hf")
    assert exported.rope_parameters["rope_theta"] == 500000.0
    assert json.loads((run_dir / "config.json").read_text())["model"]["rope_theta"] is None
    assert len(read_metrics(run_dir)) == 1


def test_checkpoint_without_tokenizer_is_refused_before_data_work(tmp_path, small_corpus, init_checkpoint):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(init_checkpoint / f, bare / f)
    cache = tmp_path / "fresh_cache"
    proc = run_train([f"data.path={small_corpus[0]}", f"data.cache_dir={cache}", f"model.name_or_path={bare}",
                      "train.max_steps=1"], tmp_path / "run", cache, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"model.name_or_path='{bare}' holds no tokenizer and data.tokenizer is not set" in out
    assert not cache.exists()  # no tokenizer trained, nothing tokenized
    # Naming a tokenizer explicitly is accepted; a checkpoint with its tokenizer uses that one.
    assert tokenizer_spec("/tok", str(bare)) == "/tok"
    assert tokenizer_spec(None, str(init_checkpoint)) == str(init_checkpoint / "tokenizer.model")
    assert tokenizer_spec(None, None) is None  # no checkpoint: SentencePiece trained on the corpus
