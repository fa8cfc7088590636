"""Clear errors for models and tokenizers, raised with the other settings before any data work, each naming
the setting and the path; command-line overrides of a checkpoint's fields are logged as changes."""

import json
import logging
import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from train import loop
from train.__main__ import to_run_config
from train.config import ModelConfig
from train.model import build_model, check_tokenizer_fits, model_shape

from .conftest import REPO, SMALL


def model_cfg(path, **kw):
    return ModelConfig(name_or_path=str(path), **{k: None for k in ("hidden_size", "intermediate_size", "num_layers",
                                                                    "num_heads", "num_kv_heads",
                                                                    "max_position_embeddings", "tie_embeddings")},
                       **kw)


def test_missing_path_and_directory_without_weights(tmp_path, init_checkpoint):
    with pytest.raises(ValueError, match=rf"model.name_or_path='{tmp_path}/nowhere' does not exist"):
        model_shape(model_cfg(tmp_path / "nowhere"))
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(init_checkpoint / "config.json", only_config / "config.json")
    with pytest.raises(ValueError, match=rf"model.name_or_path='{only_config}' holds no weights"):
        model_shape(model_cfg(only_config))
    with pytest.raises(ValueError, match=rf"model.name_or_path='{tmp_path}' holds no config.json"):
        model_shape(model_cfg(tmp_path))


def test_unreadable_or_too_large_tokenizer(tmp_path, init_checkpoint, small_corpus):
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(ValueError, match=rf"data.tokenizer: the tokenizer '{bad}' cannot be read: RuntimeError"):
        check_tokenizer_fits(model_cfg(init_checkpoint), str(bad), "data.tokenizer")
    # A checkpoint with fewer embeddings than the tokenizer has tokens.
    small = tmp_path / "small_vocab"
    shutil.copytree(init_checkpoint, small)
    c = json.loads((small / "config.json").read_text())
    c["vocab_size"] = small_corpus[2].vocab_size - 1
    (small / "config.json").write_text(json.dumps(c))
    spec = str(small / "tokenizer.model")
    n = small_corpus[2].vocab_size
    with pytest.raises(ValueError, match=rf"model.name_or_path: the tokenizer '{spec}' has {n} tokens, more than the "
                                         rf"{c['vocab_size']} embeddings of model.name_or_path="):
        check_tokenizer_fits(model_cfg(small), spec, "model.name_or_path")
    check_tokenizer_fits(model_cfg(init_checkpoint), str(init_checkpoint / "tokenizer.model"), "model.name_or_path")


@pytest.mark.parametrize("where,message", [
    pytest.param("missing", "model.name_or_path='{p}' does not exist", id="missing"),
    pytest.param("tokenizer", "data.tokenizer: the tokenizer '{p}' cannot be read", id="corrupt-tokenizer"),
    pytest.param("fused", "model.fused_ops=true: Liger-Kernel has no fused ops for model_type='olmo'",
                 id="fused-ops-architecture"),
])
def test_errors_come_before_any_data_work(tmp_path, init_checkpoint, monkeypatch, where, message):
    cache = tmp_path / "cache"
    p = tmp_path / "nowhere" if where == "missing" else tmp_path / "bad.model"
    model = p if where == "missing" else init_checkpoint
    if where == "tokenizer":
        p.write_bytes(b"garbage")
    if where == "fused":  # the same weights, as an architecture Liger-Kernel does not patch
        pytest.importorskip("liger_kernel")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # as on a GPU: fused ops would otherwise run
        model = tmp_path / "olmo"
        shutil.copytree(init_checkpoint, model)
        c = json.loads((model / "config.json").read_text())
        c.update(model_type="olmo", architectures=["OlmoForCausalLM"])
        (model / "config.json").write_text(json.dumps(c))
    overrides = [*SMALL, f"data.cache_dir={cache}", "device=cpu", f"model.name_or_path={model}"]
    if where == "tokenizer":
        overrides.append(f"data.tokenizer={p}")
    if where == "fused":
        overrides.append("model.fused_ops=true")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides), overrides)
    port_before = os.environ.get("MASTER_PORT")
    with pytest.raises(ValueError, match=message.format(p=p)):
        loop.run(cfg, tmp_path / "run", {})
    assert not cache.exists() and not (tmp_path / "run").exists()
    # nor any distributed set-up: a process group (and the MASTER_PORT it exports) left behind in this
    # process would make every later launch from it fail with "address already in use"
    assert not torch.distributed.is_initialized() and os.environ.get("MASTER_PORT") == port_before


def test_overrides_of_checkpoint_fields_are_logged_as_changes(init_checkpoint, caplog):
    cfg = model_cfg(init_checkpoint, rope_theta=1e6)
    cfg.max_position_embeddings = 8192
    with caplog.at_level(logging.INFO, logger="train.model"):
        lm = build_model(cfg, vocab_size=10)
    assert "rope_theta 500000.0 -> 1000000.0" in caplog.text
    assert "max_position_embeddings 4096 -> 8192" in caplog.text
    assert lm.config.max_position_embeddings == 8192


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_weights_that_cannot_be_loaded_are_named_with_the_loader_error(tmp_path, init_checkpoint, damage):
    """A weights file cut short or with a broken header: a ValueError naming the setting, the path and the loader's
    own error type and message (shown as ``error: ...`` by ``python -m train``)."""
    bad = tmp_path / "bad"
    shutil.copytree(init_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match=rf"model.name_or_path={bad}: its weights cannot be loaded \(\w+Error: .+"):
        build_model(model_cfg(bad), 1)
