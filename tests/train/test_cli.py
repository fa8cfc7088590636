"""``python -m train`` end to end on the embedded corpus: logs, checkpoints, exact resume, bad settings."""

import json

import pytest

from .conftest import read_metrics, run_train, small_data_args


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
    # Every evaluation reads the same validation batches, so the resumed run's final val_loss is the same.
    val = [[json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()] for d in (straight, split)]
    assert [e["step"] for e in val[0]] == [0, 4] and [e["step"] for e in val[1]] == [0, 2, 4]
    assert val[1][-1]["val_loss"] == pytest.approx(val[0][-1]["val_loss"], rel=1e-6)
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
        pytest.param("moba.bloc_size=64", "moba.bloc_size is not a setting (did you mean moba.block_size?)", id="typo"),
        pytest.param("+moba.blocksize=64", "moba.blocksize is not a setting (did you mean moba.block_size?)",
                     id="plus-typo"),
        pytest.param("moba.full_attn_layers=5", "moba.full_attn_layers=5 asks for more full layers", id="full-n"),
        pytest.param("moba.full_attn_layers=[7]", "moba.full_attn_layers contains 7", id="full-index"),
        pytest.param("moba.full_attn_layers=[1,-1]", "moba.full_attn_layers=[1, -1] names layer 1 twice",
                     id="full-twice"),
        pytest.param("model.fused_ops=true", "error: model.fused_ops=true needs ", id="fused-ops-cpu"),
    ],
)
def test_bad_setting_fails_before_training(tmp_path, data_cache, override, message):
    proc = run_train([override], tmp_path / "bad", data_cache, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr  # the message alone, not a traceback of our own check
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(
    "case,message",
    [
        pytest.param("non-string", "bad.jsonl: line 2 field 'text': expected a string, got int 5", id="non-string"),
        pytest.param("truncated", "bad.jsonl: line 2: not valid JSON (Unterminated string", id="truncated"),
        pytest.param("missing", "bad.jsonl does not exist", id="missing"),
        pytest.param("empty-dir", "yields no documents (looked for *.txt", id="empty-dir"),
        pytest.param("tokenizer", "data.tokenizer: the tokenizer", id="tokenizer"),
    ],
)
def test_bad_data_fails_with_the_message_alone(tmp_path, data_cache, case, message):
    """Errors found while reading the data or the tokenizer name the file, line and setting, and come as
    ``error: ...`` (exit status 1) without a traceback; the refused launch leaves no run folder behind."""
    bad = tmp_path / "bad.jsonl"
    args = [f"data.path={bad}"]
    if case == "non-string":
        bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    elif case == "truncated":
        bad.write_text('{"text": "fine"}\n{"text": "cut o')
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        args = [f"data.path={tmp_path / 'empty'}"]
    elif case == "tokenizer":
        args = [f"data.tokenizer={tmp_path / 'no_tokenizer'}"]
    run_dir = tmp_path / "run"
    proc = run_train(args + ["train.max_steps=1"], run_dir, data_cache, check=False)
    assert proc.returncode == 1
    assert "error: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert not run_dir.exists()


def test_a_run_dir_held_by_another_launch_is_an_error_line_and_is_kept(tmp_path, data_cache):
    """The lock of a live launch (this test's own process stands in for it): ``error: ...``, exit 1, no traceback,
    and the folder with its lock is left as it is."""
    import os
    import socket

    from train import rundir

    run_dir = tmp_path / "held"
    run_dir.mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": rundir._proc_start(os.getpid()),
            "since": "2026-01-01T00:00:00", "command": "python -m train (the other launch)"}
    (run_dir / rundir.LOCK_NAME).write_text(json.dumps(lock))
    proc = run_train(["train.max_steps=1"], run_dir, data_cache, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: hydra.run.dir={run_dir} is in use by another launch" in proc.stderr
    assert json.loads((run_dir / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("run_dir", [".", "mine", "made", "${oc.env:WORK}/mine", "oldrun", "a\\ b", "made/sub/run",
                                     "mine/made"],
                         ids=["cwd", "mine", "made", "interpolated", "old-log-only", "escaped-space", "made-parents",
                              "made-in-mine"])
def test_a_refused_launch_removes_only_the_folder_hydra_made(tmp_path, run_dir):
    """A refused launch's folder holding nothing but Hydra's log is removed only when Hydra made it ("made", with
    the parents it made for it): the
    working directory (``hydra.run.dir=.``), a folder the user made before the launch ("mine", also named through an
    interpolation or with an escaped space) and an earlier run's folder holding only its log stay, log and all."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    cwd = tmp_path / "work"
    for d in ("mine", "oldrun", "a b"):
        (cwd / d).mkdir(parents=True)
    (cwd / "oldrun" / "__main__.log").write_text("an earlier launch\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "WORK": str(cwd)}
    proc = subprocess.run([sys.executable, "-m", "train", "moba.top_k=0", f"hydra.run.dir={run_dir}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error: moba.top_k=0" in proc.stderr and "Traceback" not in proc.stderr
    assert all((cwd / d).is_dir() for d in (".", "mine", "oldrun", "a b"))
    assert (cwd / "oldrun" / "__main__.log").read_text().startswith("an earlier launch")
    assert (cwd / "made").exists() is False and (cwd / "mine" / "made").exists() is False  # with the parents made


def test_resume_errors_come_without_a_traceback_and_a_run_directory_resumes(tmp_path, data_cache):
    """A resume that cannot go on (changed model shape, a path that holds no checkpoint) is an ``error: ...``;
    ``resume=<run dir>`` takes that run's newest checkpoint, as eval / export take a run directory."""
    first = tmp_path / "first"
    run_train(["train.max_steps=2", "checkpoint.every=2"], first, data_cache)
    for args, message in (([f"resume={first}", "model.hidden_size=128"],
                           "model.hidden_size=64 there, 128 now. Use the same settings, or leave out resume= to start "
                           "fresh"),
                          ([f"resume={tmp_path}"], "is neither auto, none, a run directory with checkpoints")):
        proc = run_train(["train.max_steps=3", *args], tmp_path / "second", data_cache, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "second").exists()
    proc = run_train(["train.max_steps=3", f"resume={first}"], tmp_path / "second", data_cache)
    assert f"resumed from {first / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout + proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "second")] == [3]


def test_bad_cudnn_environment_fails_before_the_model_is_built(tmp_path, data_cache, monkeypatch):
    """MOBA_CUDNN_MIN_SEQLEN=4k: moba_core.varlen.cudnn_env's error, raised by the config check before data and
    model (it used to come from the first attention call, after "model ops: ..." was logged)."""
    monkeypatch.setenv("MOBA_CUDNN_MIN_SEQLEN", "4k")
    proc = run_train(["train.max_steps=1"], tmp_path / "bad", data_cache, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "MOBA_CUDNN_MIN_SEQLEN='4k' must be a positive number of tokens" in out
    assert "model ops:" not in out and not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_resume_none_refuses_to_overwrite_and_changed_settings_are_named(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_train(["train.max_steps=2", "checkpoint.every=1", "train.eval_every=1"], run_dir, data_cache)
    proc = run_train(["train.max_steps=3", "resume=none"], run_dir, data_cache, check=False)
    assert proc.returncode == 1 and "error: resume=none but" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train(["train.max_steps=3", "data.seq_len=512"], run_dir, data_cache, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "data.seq_len=256 there, 512 now" in out
    # A failed resume adds no eval lines; every step is evaluated once (eval_every=1, no repeated final eval).
    evals = [line for line in (run_dir / "eval.jsonl").read_text().splitlines() if line]
    assert [json.loads(e)["step"] for e in evals] == [0, 1, 2]


def test_latest_pointing_nowhere_falls_back_and_pruning_keeps_the_new_tag(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_train(["train.max_steps=3", "checkpoint.every=1", "checkpoint.keep=2"], run_dir, data_cache)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    (ckpts / "latest").write_text("step_00000099")  # as if the last save had been cut off
    proc = run_train(["train.max_steps=4", "checkpoint.every=1", "checkpoint.keep=2"], run_dir, data_cache)
    assert "at step 3" in proc.stdout + proc.stderr
    assert (ckpts / "latest").read_text() == "step_00000004" and (ckpts / "step_00000004").is_dir()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path, data_cache):
    """A pre-empted run (SIGTERM, as SLURM sends) checkpoints the step it reached and resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO, SMALL

    run_dir = tmp_path / "run"
    env = {**os.environ, "MOBA_CACHE": str(data_cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train", *SMALL, f"hydra.run.dir={run_dir}", "train.max_steps=500",
           "checkpoint.every=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: a chain of stages (make train) stops here
    steps = [m["step"] for m in read_metrics(run_dir)]
    tag = f"step_{steps[-1]:08d}"
    assert 3 <= steps[-1] < 500
    assert (f"stopped by a signal at step {steps[-1]} (SIGTERM): checkpoint saved: {run_dir / 'checkpoints' / tag}; "
            f"to resume from it, run python -m train with the same settings and hydra.run.dir={run_dir}; exit status "
            "143") in out
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    proc2 = run_train([f"train.max_steps={steps[-1] + 1}", "checkpoint.every=1000"], run_dir, data_cache)
    assert f"at step {steps[-1]}" in proc2.stdout + proc2.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps[-1] + 2))


def test_optimizer_offload_matches_zero2(tmp_path, data_cache):
    """ZeRO-2 with the optimizer states offloaded to CPU memory gives the same losses as without."""
    common = ["train.max_steps=3", "parallel.zero_stage=2"]
    run_train([*common, "checkpoint.enabled=false"], tmp_path / "z2", data_cache)
    run_train([*common, "parallel.offload_optimizer=true"], tmp_path / "off", data_cache)
    a, b = read_metrics(tmp_path / "z2"), read_metrics(tmp_path / "off")
    # checkpoint.enabled=false (the benchmark's setting) writes no checkpoint, not even the final one
    assert not list((tmp_path / "z2").glob("checkpoints/step_*"))
    assert (tmp_path / "off" / "checkpoints" / "step_00000003").is_dir()
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)


def test_a_fresh_start_replaces_the_export_of_a_launch_that_saved_no_checkpoint(tmp_path, small_corpus):
    """checkpoint.enabled=false writes hf/ but no checkpoint; the next launch starts from scratch. Its final
    export used to be skipped (hf/ already said step 2), leaving the first launch's weights as the run's."""
    import torch
    from safetensors.torch import load_file

    run_dir, cache = tmp_path / "run", small_corpus[1]
    common = ["train.max_steps=2", "checkpoint.enabled=false", "checkpoint.export_hf=true",
              *small_data_args(small_corpus)]
    run_train([*common, "seed=1"], run_dir, cache)
    first = load_file(run_dir / "hf" / "model.safetensors")
    proc = run_train([*common, "seed=2"], run_dir, cache)
    assert f"removing {run_dir / 'hf'}: an HF export of step 2 of an earlier launch" in proc.stdout + proc.stderr
    second = load_file(run_dir / "hf" / "model.safetensors")
    assert json.loads((run_dir / "hf" / "moba_export.json").read_text()) == {"step": 2}
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def test_a_fresh_start_keeps_an_export_it_starts_from(tmp_path):
    from train.loop import drop_stale_export

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "moba_export.json").write_text('{"step": 2}')
    drop_stale_export(hf, keep=[str(hf), None])
    drop_stale_export(hf, keep=[None, str(hf / "tokenizer.model")])
    assert hf.is_dir()
    drop_stale_export(hf, keep=[str(tmp_path / "other"), None])
    assert not hf.exists()
    drop_stale_export(hf)  # nothing there: nothing to do


def test_resume_with_more_steps_and_another_lr_follows_the_new_schedule(tmp_path, small_corpus):
    """Raising train.max_steps and changing optim.lr on resume: the first resumed step already trains at the
    rate the new schedule (with the new optim.lr) has at that step, not at the checkpoint's (the scheduler's
    saved base LR and last rate came back with it: step 4 ran at the old end value, optim.lr was ignored)."""
    from types import SimpleNamespace

    from train.loop import lr_lambda

    run, data = tmp_path / "run", small_data_args(small_corpus)
    run_train(["train.max_steps=3", *data], run, small_corpus[1])
    run_train(["train.max_steps=6", "optim.lr=2e-3", *data], run, small_corpus[1])
    lam = lr_lambda(SimpleNamespace(optim=SimpleNamespace(warmup_steps=2, min_lr_ratio=0.1),
                                    train=SimpleNamespace(max_steps=6)))
    assert [r["lr"] for r in read_metrics(run)][3:] == pytest.approx([2e-3 * lam(s) for s in (3, 4, 5)])


def test_checkpoint_dir_is_recorded_absolute_and_a_relaunch_without_it_is_refused(tmp_path, data_cache):
    """``checkpoint.dir`` given relative to the launch folder is recorded absolute in config.json (eval, export and
    resume= find it from anywhere); relaunching the run dir without the setting would start at step 0 beside the
    run's checkpoints: refused, naming the setting that continues the run, and the run's records are kept."""
    import os

    from .conftest import REPO

    run_dir, ck = tmp_path / "run", tmp_path / "ck"
    run_train(["train.max_steps=1", "checkpoint.every=1", f"checkpoint.dir={os.path.relpath(ck, REPO)}"], run_dir,
              data_cache)
    assert json.loads((run_dir / "config.json").read_text())["checkpoint"]["dir"] == str(ck.resolve())
    metrics = (run_dir / "metrics.jsonl").read_text()
    proc = run_train(["train.max_steps=2"], run_dir, data_cache, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: hydra.run.dir={run_dir} keeps its checkpoints in {ck.resolve()}" in proc.stderr
    assert f"set checkpoint.dir={ck.resolve()} to continue that run" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    run_train(["train.max_steps=2", f"checkpoint.dir={ck}"], run_dir, data_cache)  # the fix it names
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"step"' in line][-1] == 2
