"""``python -m train`` end to end on the embedded corpus: logs, checkpoints, exact resume, bad settings."""

import pytest

from .conftest import read_metrics, run_train


def test_train_then_resume_matches_uninterrupted_run(tmp_path, data_cache):
    """4 steps straight vs 2 steps + ``resume=auto`` to 4, with gradient accumulation 2: same losses (exact
    resume of model, optimizer, LR schedule and data order counted in micro-batches), checkpoints on disk,
    metrics with the required keys."""
    ga = "train.grad_accum=2"
    straight = tmp_path / "straight"
    run_train(["train.max_steps=4", "checkpoint.every=2", ga], straight, data_cache)
    split = tmp_path / "split"
    run_train(["train.max_steps=2", "checkpoint.every=2", ga], split, data_cache)
    proc = run_train(["train.max_steps=4", "checkpoint.every=2", "resume=auto", ga], split, data_cache)
    assert "resumed from" in proc.stderr + proc.stdout and "at step 2" in proc.stderr + proc.stdout
    a, b = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
        assert ma["tokens"] == mb["tokens"]
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4) and ma["grad_norm"] > 0
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "moba_layers"):
        assert key in a[-1]
    assert a[-1]["moba_layers"] == 2 and a[-1]["tokens"] == 4 * 2 * 2 * 256
    assert a[-1]["loss"] < a[0]["loss"]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (split / "checkpoints" / "step_00000004").is_dir()


def test_full_schedule_and_hf_export_then_continue(tmp_path, data_cache):
    """A full-attention stage exports an HF checkpoint; a MoBA stage continues from it."""
    base = tmp_path / "base"
    run_train(["schedule=full", "train.max_steps=2", "checkpoint.export_hf=true"], base, data_cache)
    assert [m["moba_layers"] for m in read_metrics(base)] == [0, 0]
    assert (base / "hf" / "config.json").is_file() and (base / "hf" / "model.safetensors").is_file()
    moba = tmp_path / "moba"
    proc = run_train([f"model.name_or_path={base / 'hf'}", "data.seq_len=512", "train.max_steps=1",
                      "moba.full_attn_layers=1"], moba, data_cache)
    assert "loaded" in proc.stderr + proc.stdout
    assert read_metrics(moba)[0]["moba_layers"] == 1


@pytest.mark.parametrize(
    "override,message",
    [
        pytest.param("moba.block_size=0", "moba.block_size=0", id="block0"),
        pytest.param("moba.top_k=0", "moba.top_k=0", id="topk0"),
        pytest.param("data.seq_len=16", "data.seq_len=16 is smaller than moba.block_size=32", id="seq-lt-block"),
        pytest.param("parallel.zero_stage=5", "parallel.zero_stage=5", id="zero5"),
        pytest.param("moba.bloc_size=64", "bloc_size", id="typo"),
    ],
)
def test_bad_setting_fails_before_training(tmp_path, data_cache, override, message):
    proc = run_train([override], tmp_path / "bad", data_cache, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "checkpoints").exists()
