"""The run directory's records, in process: the lock and its holder, the launch time every rank shares, the
config history, metrics files cut by a crash, and checkpoints whose files are truncated."""

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from train import checkpoint as ckpt
from train import rundir
from train.config import WandbConfig
from train.metrics import MetricsLogger


def lock_of(pid, host=None, **extra):
    return {"host": host or socket.gethostname(), "pid": pid, "proc_start": rundir._proc_start(pid),
            "since": "2026-01-01T00:00:00", "command": "python -m train (the other launch)", "slurm_job": None,
            "slurm_restart": 0, "torchrun_run": None, "torchrun_restart": 0, **extra}


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_keeps_the_run_dir_and_is_named(tmp_path):
    other = os.getppid()  # a live process that is not this one
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(lock_of(other)))
    with pytest.raises(ValueError) as e:
        rundir.RunDirLock([("hydra.run.dir", tmp_path)]).acquire()
    msg = str(e.value)
    assert f"hydra.run.dir={tmp_path} is in use" in msg and f"pid {other} on host {socket.gethostname()}" in msg
    assert "the other launch" in msg and str(tmp_path / rundir.LOCK_NAME) in msg
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == other  # untouched


def test_a_holder_on_another_host_is_never_taken_for_stale(tmp_path):
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(lock_of(dead_pid(), host="node-elsewhere")))
    with pytest.raises(ValueError, match="pid .* on host node-elsewhere"):
        rundir.RunDirLock([("hydra.run.dir", tmp_path)]).acquire()


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param(lambda: lock_of(dead_pid()), id="process-gone"),
        pytest.param(lambda: lock_of(os.getppid(), proc_start="1"), id="pid-reused"),
    ],
)
def test_a_stale_lock_is_taken_over_with_a_warning_and_released(tmp_path, caplog, holder):
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(holder()))
    with caplog.at_level(logging.WARNING, logger="train.rundir"):
        with rundir.RunDirLock([("hydra.run.dir", tmp_path)]):
            assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text and str(tmp_path / rundir.LOCK_NAME) in caplog.text
    assert not (tmp_path / rundir.LOCK_NAME).exists()


def test_an_earlier_attempt_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    holder = lock_of(12345, host="node-before-requeue", slurm_job="4242", slurm_restart=0)
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(holder))
    with rundir.RunDirLock([("hydra.run.dir", tmp_path)]):
        pass


def test_a_lock_another_process_holds_stops_a_second_process(tmp_path):
    """Two real processes: the second one's acquire fails while the first holds the directory."""
    code = ("import sys, time; from pathlib import Path; from train.rundir import RunDirLock\n"
            f"lock = RunDirLock([('hydra.run.dir', Path({str(tmp_path)!r}))]); lock.acquire()\n"
            "print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {holder.pid} on host"):
            rundir.RunDirLock([("hydra.run.dir", tmp_path)]).acquire()
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunDirLock([("hydra.run.dir", tmp_path)]):  # its process is gone now
        pass


def test_a_checkpoint_dir_outside_the_run_dir_is_locked_too(tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "shared_ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / rundir.LOCK_NAME).write_text(json.dumps(lock_of(os.getppid())))
    with pytest.raises(ValueError, match=f"checkpoint.dir={ckpt_dir} is in use"):
        with rundir.claim_run_dir(run_dir, ckpt_dir):
            pass
    assert not (run_dir / rundir.LOCK_NAME).exists()  # released again


def test_launch_time_is_shared_through_the_environment_and_cached(monkeypatch):
    monkeypatch.setattr(rundir, "_launch_time", None)
    monkeypatch.setenv(rundir.LAUNCH_TIME_ENV, "1700000000.5")
    day = rundir.launch_time("%Y-%m-%d")
    monkeypatch.setenv(rundir.LAUNCH_TIME_ENV, "1800000000")
    assert rundir.launch_time("%Y-%m-%d") == day  # decided once per process
    monkeypatch.setattr(rundir, "_launch_time", None)
    monkeypatch.setenv(rundir.LAUNCH_TIME_ENV, "yesterday")
    with pytest.raises(ValueError, match="MOBA_LAUNCH_TIME='yesterday'"):
        rundir.launch_time("%H")


def test_config_history_keeps_every_launch_and_names_changed_settings(tmp_path, caplog):
    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    first = {"moba": {"top_k": 3, "block_size": 32}, "train": {"max_steps": 2}}
    (tag / "run_config.json").write_text(json.dumps(first))
    rundir.record_config(tmp_path, first)
    second = {"moba": {"top_k": 2, "block_size": 32}, "train": {"max_steps": 4}}
    with caplog.at_level(logging.INFO, logger="train.rundir"):
        rundir.record_config(tmp_path, second, resumed_from=tag)
    assert "moba.top_k 3 -> 2" in caplog.text and "train.max_steps 2 -> 4" in caplog.text
    assert "block_size" not in caplog.text
    entries = sorted((tmp_path / rundir.HISTORY_DIR).iterdir())
    assert [p.name[:4] for p in entries] == ["001_", "002_"]
    assert [json.loads(p.read_text())["config"] for p in entries] == [first, second]
    assert json.loads((tmp_path / "config.json").read_text()) == second


def metrics_logger(run_dir, resumed_step):
    return MetricsLogger(run_dir, resumed_step, WandbConfig(mode="disabled"), {}, 10, "off", enabled=True)


def test_a_partial_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')
    (tmp_path / "eval.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n{"step": 2, "val_')
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        m = metrics_logger(tmp_path, 2)
    assert str(tmp_path / "metrics.jsonl") in caplog.text and str(tmp_path / "eval.jsonl") in caplog.text
    m.log({"step": 3, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0})
    m.log_eval(3, {"val_loss": 1.5})
    m.close()
    read = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in read] == [1, 2, 3]
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 3]
    assert not m.has_eval(2) and m.has_eval(3)


def test_a_fresh_start_drops_the_records_of_a_run_that_never_checkpointed(tmp_path):
    """A run killed before its first checkpoint left its step-0 evaluation; the next launch starts from
    scratch and evaluates step 0 again: eval.jsonl must hold it once."""
    (tmp_path / "eval.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    m = metrics_logger(tmp_path, 0)
    m.log_eval(0, {"val_loss": 2.0})
    m.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0]
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def fake_tag(ckpt_dir, step):
    tag = ckpt_dir / ckpt.tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"w": torch.randn(64)}, tag / "mp_rank_00_model_states.pt")
    torch.save({"rng": 1}, tag / "rng_rank0.pt")
    ckpt.write_manifest(tag)
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    fake_tag(tmp_path, 1)
    bad = fake_tag(tmp_path, 2) / "mp_rank_00_model_states.pt"
    truncate(bad)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert ckpt.resolve_resume("auto", tmp_path) == (tmp_path, "step_00000001")
    assert str(bad) in caplog.text and "truncated" in caplog.text
    with pytest.raises(ValueError, match=f"resume={tmp_path / 'step_00000002'} cannot be loaded: {bad}"):
        ckpt.resolve_resume(str(tmp_path / "step_00000002"), tmp_path)


def test_a_checkpoint_saved_before_manifests_is_checked_as_a_torch_archive(tmp_path):
    fake_tag(tmp_path, 1)
    tag = fake_tag(tmp_path, 2)
    (tag / ckpt.MANIFEST).unlink()
    truncate(tag / "rng_rank0.pt")
    assert ckpt.latest_tag(tmp_path) == "step_00000001"


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    truncate(fake_tag(tmp_path, 1) / "rng_rank0.pt")
    with pytest.raises(ValueError, match="no loadable checkpoint in .*rng_rank0.pt"):
        ckpt.resolve_resume("auto", tmp_path)
    # A save cut off before it finished (no manifest, no `latest`) is no checkpoint: start from scratch.
    other = tmp_path / "other"
    (other / "step_00000001").mkdir(parents=True)
    torch.save({"w": 1}, other / "step_00000001" / "mp_rank_00_model_states.pt")
    assert ckpt.resolve_resume("auto", other) is None


def test_resume_from_a_path_that_does_not_exist_says_so_and_lists_the_checkpoints_left(tmp_path):
    """A pruned tag (checkpoint.keep) or a mistyped directory: the error says the path does not exist and, for a
    tag, which checkpoints its directory still holds."""
    fake_tag(tmp_path, 4)
    fake_tag(tmp_path, 6)
    with pytest.raises(ValueError, match=r"resume='.*step_00000003' does not exist; .* holds step_00000004, "
                                         r"step_00000006 \(resume=auto"):
        ckpt.resolve_resume(str(tmp_path / "step_00000003"), tmp_path)
    with pytest.raises(ValueError, match=r"resume='.*nowhere' does not exist \(resume=auto"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "notes.txt").write_text("x")  # a path that exists but holds no checkpoint
    with pytest.raises(ValueError, match="is neither auto, none, a run directory with checkpoints, a checkpoint "
                                         "directory"):
        ckpt.resolve_resume(str(tmp_path / "notes.txt"), tmp_path)


def test_resume_from_a_run_directory_takes_its_newest_loadable_checkpoint(tmp_path):
    """``resume=<run dir>`` (as eval / export take it): the newest complete checkpoint of ``<run dir>/checkpoints``;
    a run directory without one is refused like any path that holds no checkpoint."""
    run = tmp_path / "run"
    fake_tag(run / "checkpoints", 3)
    truncate(fake_tag(run / "checkpoints", 5) / "rng_rank0.pt")
    assert ckpt.resolve_resume(str(run), tmp_path / "elsewhere") == (run / "checkpoints", "step_00000003")
    # a run that kept its checkpoints elsewhere (checkpoint.dir, recorded in its config.json)
    elsewhere = tmp_path / "ckpt_store"
    fake_tag(elsewhere, 7)
    (tmp_path / "run_b").mkdir()
    (tmp_path / "run_b" / "config.json").write_text(json.dumps({"checkpoint": {"dir": str(elsewhere)}}))
    assert ckpt.resolve_resume(str(tmp_path / "run_b"), tmp_path / "elsewhere") == (elsewhere, "step_00000007")
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="a run directory with checkpoints"):
        ckpt.resolve_resume(str(empty), tmp_path / "elsewhere")


def test_resuming_with_other_documents_is_refused_naming_data_documents(tmp_path):
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    saved = {"data": {"path": "/corpus", "documents": "module"}, "world_size": 1}
    (tag / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"data.documents='module' there, 'package' now"):
        ckpt.check_resume_compatible(tmp_path, tag.name, {"data": {"path": "/corpus", "documents": "package"},
                                                          "world_size": 1})
    ckpt.check_resume_compatible(tmp_path, tag.name, saved)  # same settings: no error
    # a checkpoint saved before data.documents existed ran module-level documents
    (tag / "run_config.json").write_text(json.dumps({"data": {"path": "/corpus"}, "world_size": 1}))
    ckpt.check_resume_compatible(tmp_path, tag.name, saved)
    with pytest.raises(ValueError, match=r"data.documents='module' there, 'package' now"):
        ckpt.check_resume_compatible(tmp_path, tag.name, {"data": {"path": "/corpus", "documents": "package"},
                                                          "world_size": 1})


def test_changed_settings_leave_out_where_the_tokenizer_copy_lives():
    """Resuming another run's checkpoint changes only the path of its tokenizer copy (a record, not a setting):
    not listed; a changed tokenizer fingerprint still is."""
    a = {"data_identity": {"tokenizer": "abc", "tokenizer_copy": "/runs/a/tokenizer"}, "moba": {"top_k": 3}}
    b = {"data_identity": {"tokenizer": "abc", "tokenizer_copy": "/runs/b/tokenizer"}, "moba": {"top_k": 3}}
    assert rundir.changed_settings(a, b) == []
    c = {"data_identity": {"tokenizer": "xyz", "tokenizer_copy": "/runs/b/tokenizer"}, "moba": {"top_k": 2}}
    assert rundir.changed_settings(a, c) == ["data_identity.tokenizer abc -> xyz", "moba.top_k 3 -> 2"]


def test_store_tokenizer_keeps_the_copy_of_the_run_it_resumes(tmp_path):
    """The first launch writes the tokenizer; a launch resuming this run with the same tokenizer leaves the copy
    as it is; another tokenizer fingerprint (or another run's record) writes it again."""
    from train.data_identity import TOKENIZER_DIR, store_tokenizer

    class Tok:
        name, saves = "fake", 0

        def __init__(self, fingerprint):
            self.fingerprint = fingerprint

        def save(self, path):
            Tok.saves += 1
            os.makedirs(path)
            (path / "vocab.txt").write_text(self.fingerprint)

    out = tmp_path / TOKENIZER_DIR
    store_tokenizer(Tok("f1"), tmp_path)
    saved = {"tokenizer": "f1", "tokenizer_copy": str(out.resolve())}
    store_tokenizer(Tok("f1"), tmp_path, saved)
    assert Tok.saves == 1 and (out / "vocab.txt").read_text() == "f1"
    store_tokenizer(Tok("f1"), tmp_path, {**saved, "tokenizer_copy": "/elsewhere/tokenizer"})
    store_tokenizer(Tok("f2"), tmp_path, saved)
    assert Tok.saves == 3 and (out / "vocab.txt").read_text() == "f2"


def test_a_launch_that_would_save_beside_the_runs_own_checkpoints_is_refused(tmp_path):
    """A run dir whose earlier launch kept its checkpoints in ``checkpoint.dir=elsewhere``: a launch into it that
    would save to another folder (the setting left out) is refused naming both and the fix, not started at step 0;
    the same folder, a run dir without records, or a recorded folder without checkpoints pass."""
    from train.checkpoint import check_same_checkpoint_dir

    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    check_same_checkpoint_dir(run_dir, run_dir / "checkpoints")  # no config.json: a new run
    (run_dir / "config.json").write_text(json.dumps({"checkpoint": {"dir": str(elsewhere)}}))
    check_same_checkpoint_dir(run_dir, run_dir / "checkpoints")  # recorded folder holds no checkpoint yet
    (elsewhere / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"keeps its checkpoints in {elsewhere} (its earlier launch's "
                                                   f"checkpoint.dir), but this launch would save them to "
                                                   f"{run_dir / 'checkpoints'}: set checkpoint.dir={elsewhere}")):
        check_same_checkpoint_dir(run_dir, run_dir / "checkpoints")
    check_same_checkpoint_dir(run_dir, elsewhere)
    # the other way round: checkpoints in the run dir, checkpoint.dir newly set
    (run_dir / "config.json").write_text(json.dumps({"checkpoint": {"dir": None}}))
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match="set checkpoint.dir=null to continue that run"):
        check_same_checkpoint_dir(run_dir, elsewhere)


@pytest.mark.parametrize("resume, ckpt_dir, advice", [
    (None, None, "another hydra.run.dir (or resume=none there) to start fresh"),
    ("auto", "/ckpts", "another hydra.run.dir and checkpoint.dir to start fresh"),
    ("/old/run", None, "leave out resume= to start fresh (in a hydra.run.dir without checkpoints of its own)"),
])
def test_a_resume_with_changed_settings_names_a_way_to_start_fresh_that_works(tmp_path, resume, ckpt_dir, advice):
    """With ``checkpoint.dir`` set, another run dir alone would resume (or refuse resume=none over) the same
    checkpoints: the advice names both settings."""
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    (tag / "run_config.json").write_text(json.dumps({"data": {"path": "/corpus", "documents": "module"}}))
    now = {"data": {"path": "/corpus", "documents": "package"}, "resume": resume, "checkpoint": {"dir": ckpt_dir}}
    with pytest.raises(ValueError, match=re.escape(f"Use the same settings, or {advice}")):
        ckpt.check_resume_compatible(tmp_path, tag.name, now)
