"""``python -m train.bench`` on the CPU: points parsed, real runs summarised into results JSON and a table,
reruns into the same run root, failures recorded as rows."""

import json

import pytest
import torch

from train.bench import (
    MARK_BEGIN,
    MARK_END,
    check_extra,
    main,
    merge_json,
    parse_point,
    point_label,
    point_name,
    point_overrides,
    table,
)

from .conftest import SMALL, small_data_args


def test_points_parse_and_name_their_overrides():
    assert parse_point("32768:full") == {"seq_len": 32768, "attention": "full", "moba": None, "gpus": 1,
                                         "activation_checkpointing": True, "recompute_attention": True,
                                         "recompute_routing": True}
    assert parse_point("1048576:512:8@sp2") == {"seq_len": 1048576, "attention": "moba", "moba": "512:8", "gpus": 2,
                                                "activation_checkpointing": True, "recompute_attention": True,
                                                "recompute_routing": True}
    assert parse_point("32768:512:8@nockpt@sp2") == {**parse_point("32768:512:8@sp2"),
                                                     "activation_checkpointing": False}
    assert parse_point("32768:512:8@keepattn") == {**parse_point("32768:512:8"), "recompute_attention": False}
    assert parse_point("32768:512:8@keeproute@sp2") == {**parse_point("32768:512:8@sp2"), "recompute_routing": False}
    for bad in ("32768", "32768:512", "x:full", "32768:full@dp2", "32768:512:8:1", "32768:full@sp2@sp2",
                "32768:full@nockpt@nockpt", "32768:full@ckpt", "32768:full@nockpt@keepattn",
                "32768:full@keeproute", "32768:512:8@keeproute@keepattn", "32768:512:8@nockpt@keeproute"):
        with pytest.raises(ValueError, match=f"--points: '{bad}' is not SEQ_LEN:full"):
            parse_point(bad)
    o = point_overrides(parse_point("4096:256:4@sp2"), 5)
    assert o[:2] == ["model=llama_1b", "data.documents=package"]
    assert {"data.seq_len=4096", "train.max_steps=5", "optim.warmup_steps=5", "parallel.sp_size=2", "schedule=moba",
            "moba.block_size=256", "moba.top_k=4", "checkpoint.enabled=false"} <= set(o)
    assert "schedule=full" in point_overrides(parse_point("4096:full"), 5)
    assert "train.activation_checkpointing=true" in o
    assert "train.activation_checkpointing=false" in point_overrides(parse_point("4096:full@nockpt"), 5)
    assert "train.recompute_attention=true" in o
    kept = point_overrides(parse_point("4096:full@keepattn"), 5)
    assert {"train.activation_checkpointing=true", "train.recompute_attention=false"} <= set(kept)
    assert point_name(parse_point("4096:256:4@keepattn")) == "4096_256-4_sp1_keepattn"
    assert "train.recompute_routing=true" in o
    route = point_overrides(parse_point("4096:256:4@keeproute"), 5)
    assert {"train.recompute_attention=true", "train.recompute_routing=false"} <= set(route)
    assert point_name(parse_point("4096:256:4@keeproute")) == "4096_256-4_sp1_keeproute"
    assert "data.packing=best_fit" in o and "data.packing=concat" in point_overrides(parse_point("4096:full"), 5,
                                                                                    packing="concat")
    assert "train.profile_step=0" in o
    prof = point_overrides(parse_point("4096:full"), 5, profile=True)  # one step more, profiled
    assert {"train.max_steps=6", "train.profile_step=6", "optim.warmup_steps=5"} <= set(prof)


@pytest.mark.parametrize("args,message", [
    pytest.param(["--", "data.seq_len=128"], "override 'data.seq_len=128' after -- would replace the benchmark's own "
                 "data.seq_len: set it with --points", id="seq_len"),
    pytest.param(["--", "moba.top_k=3"], "own moba.top_k: set it with --points", id="top_k"),
    pytest.param(["--", "+schedule.reverse=true"], "own schedule.reverse: set it with --points", id="schedule"),
    pytest.param(["--", "model=tiny"], "own model: set it with --model", id="model"),
    pytest.param(["--", "train.max_steps=9"], "own train.max_steps: set it with --steps", id="steps-key"),
    pytest.param(["--", "train.activation_checkpointing=false"], "own train.activation_checkpointing: set it with "
                 "--points (@nockpt)", id="checkpointing"),
    pytest.param(["--", "data.packing=concat"], "own data.packing: set it with --packing", id="packing"),
    pytest.param(["--", "train.recompute_attention=false"], "own train.recompute_attention: set it with --points "
                 "(@keepattn)", id="recompute-attention"),
    pytest.param(["--", "train.recompute_routing=false"], "own train.recompute_routing: set it with --points "
                 "(@keeproute)", id="recompute-routing"),
    pytest.param(["--steps", "0"], "--steps 0 must be >= 1", id="steps"),
    pytest.param(["--timeout", "0"], "--timeout 0 must be > 0 seconds", id="timeout"),
    pytest.param(["--points", " , "], "--points ' , ' names no point", id="no-point"),
    pytest.param(["--points", "256:full,256:32:2,256:full"], "names a point twice", id="twice"),
])
def test_bad_arguments_stop_before_any_run(tmp_path, capsys, args, message):
    """An override after -- of a setting the point fixes used to win silently: the row said 256 tokens, top-2
    and the run trained at 128 tokens, top-3."""
    md, js, root = tmp_path / "B.md", tmp_path / "train.json", tmp_path / "runs"
    base = ["--points", "256:32:2", "--model", "tiny", "--run-root", str(root), "--output", str(md), "--json", str(js)]
    assert main([*base, *args]) == 2
    assert message in capsys.readouterr().err
    assert not root.exists() and not md.exists() and not js.exists()
    # settings a point leaves open pass
    check_extra(["model.fused_ops=false", "model.num_layers=2", "moba.backend=flash", "data.path=x"])


def test_json_rows_of_a_point_are_replaced_and_others_kept(tmp_path):
    f = tmp_path / "train.json"
    row = {"seq_len": 8, "attention": "full", "moba": None, "gpus": 1, "tokens_per_s": 1.0}
    two = {**row, "gpus": 2, "tokens_per_s": 5.0}
    merge_json(f, [row, two])
    merge_json(f, [{**row, "tokens_per_s": 3.0}])
    assert sorted((r["gpus"], r["tokens_per_s"]) for r in json.loads(f.read_text())) == [(1, 3.0), (2, 5.0)]
    # a run without activation checkpointing is its own row; a row without the field ran with checkpointing
    merge_json(f, [{**row, "activation_checkpointing": False, "tokens_per_s": 7.0}])
    merge_json(f, [{**row, "activation_checkpointing": True, "tokens_per_s": 4.0}])
    rows = json.loads(f.read_text())
    got = sorted((r["gpus"], r.get("activation_checkpointing", True), r["tokens_per_s"]) for r in rows)
    assert got == [(1, False, 7.0), (1, True, 4.0), (2, True, 5.0)]
    # a run with another packing is its own row too; a row without the field was packed by concat
    merge_json(f, [{**row, "packing": "best_fit", "tokens_per_s": 9.0}])
    merge_json(f, [{**row, "packing": "concat", "tokens_per_s": 8.0}])
    rows = json.loads(f.read_text())
    got = sorted((r["gpus"], r.get("activation_checkpointing", True), r.get("packing", "concat"), r["tokens_per_s"])
                 for r in rows)
    assert got == [(1, False, "concat", 7.0), (1, True, "best_fit", 9.0), (1, True, "concat", 8.0),
                   (2, True, "concat", 5.0)]
    # and one that keeps the attention outputs; a row without the field recomputed them
    merge_json(f, [{**row, "recompute_attention": False, "tokens_per_s": 6.0}])
    merge_json(f, [{**row, "recompute_attention": True, "tokens_per_s": 8.5}])
    rows = json.loads(f.read_text())
    got = sorted((r.get("packing", "concat"), r.get("recompute_attention", True), r["tokens_per_s"]) for r in rows
                 if r["gpus"] == 1 and r.get("activation_checkpointing", True))
    assert got == [("best_fit", True, 9.0), ("concat", False, 6.0), ("concat", True, 8.5)]
    # and one that keeps MoBA's routing; a row without the field recomputed it
    moba = {**row, "attention": "moba", "moba": "16:2"}
    merge_json(f, [{**moba, "tokens_per_s": 2.0}, {**moba, "recompute_routing": False, "tokens_per_s": 2.5}])
    merge_json(f, [{**moba, "recompute_routing": True, "tokens_per_s": 2.2}])
    got = sorted((r.get("recompute_routing", True), r["tokens_per_s"]) for r in json.loads(f.read_text())
                 if r["attention"] == "moba")
    assert got == [(False, 2.5), (True, 2.2)]


def test_vs_full_compares_rows_of_the_same_checkpointing():
    """A MoBA row's speed-up is against the full-attention row of the same length, GPUs, checkpointing, packing and
    attention recompute: here 10 s / 4 s for the plain pair and 6 s / 3 s for the kept-attention pair."""
    def row(point, step_s):
        return {**parse_point(point), "packing": "best_fit", "ok": True, "error": None, "tokens_per_s": 1.0,
                "step_s": step_s, "mfu": 0.3, "peak_gib": 1.0, "losses": [1.0]}

    rows = [row("8:full", 10.0), row("8:16:2", 4.0), row("8:full@keepattn", 6.0), row("8:16:2@keepattn", 3.0),
            row("8:16:2@keeproute", 3.6)]
    text = table(rows, "cmd", "gpu")
    assert f"| {point_label(rows[1])} | 1 | 4.00 | 2.50x |" in text
    assert f"| {point_label(rows[3])} | 1 | 3.00 | 2.00x |" in text
    assert point_label(rows[3]) == "MoBA 16:2 (attention kept)"
    # keeping MoBA's routing leaves full attention as it is: against the plain full row, 10 s / 3.6 s
    assert point_label(rows[4]) == "MoBA 16:2 (routing kept)"
    assert f"| {point_label(rows[4])} | 1 | 3.60 | 2.78x |" in text


def test_summary_of_metrics_rows_hand_worked():
    """Steps 3 and 4 (after two warm-up steps) of 1000 tokens each at 2000 and 4000 tokens/s: 0.5 s and 0.25 s,
    so 2000 tokens in 0.75 s (2667 tokens/s; the median of the two rates said 3000, as if both samples cost the
    same), MFU (0.2 * 0.5 + 0.4 * 0.25) / 0.75. ``tokens`` in metrics.jsonl counts the run's tokens so far:
    step_s was tokens / tokens_per_s (1.5 s and 1 s), the step time times the step number. A row carries no
    per-GPU rate (tokens_per_s / gpus: both are in it)."""
    from train.bench import summarize

    rows = [{"step": i + 1, "tokens": 1000 * (i + 1), "tokens_per_s": tps, "mfu": mfu, "mem_gb": mem, "loss": loss}
            for i, (tps, mfu, mem, loss) in enumerate([(100.0, 0.01, 1.0, 9.0), (500.0, 0.1, 3.0, 8.0),
                                                       (2000.0, 0.2, 2.0, 7.0), (4000.0, 0.4, None, 6.0)])]
    assert summarize(rows) == {"tokens_per_s": pytest.approx(2000 / 0.75), "step_s": 0.375,
                               "mfu": pytest.approx(0.2 / 0.75), "peak_gib": 3.0, "losses": [9.0, 8.0, 7.0, 6.0]}
    assert summarize(rows[:1])["step_s"] == 10.0  # fewer than three steps: all of them


def test_summary_leaves_out_steps_without_a_rate():
    """A step with tokens/s 0 (or null) has no time to count. When the steps after the first two had none, the
    summary divided by zero (ZeroDivisionError: the benchmark stopped) instead of taking the steps that have one,
    as it does when there are fewer than three; with no rate at all it says so."""
    from train.bench import summarize

    rows = [{"step": i + 1, "tokens": 1000 * (i + 1), "tokens_per_s": tps, "mfu": mfu, "mem_gb": None, "loss": 5.0}
            for i, (tps, mfu) in enumerate([(1000.0, 0.1), (500.0, 0.2), (0.0, None)])]
    # steps 1 and 2: 1000 tokens in 1 s and in 2 s
    assert summarize(rows) == {"tokens_per_s": pytest.approx(2000 / 3), "step_s": 1.5,
                               "mfu": pytest.approx((0.1 * 1 + 0.2 * 2) / 3), "peak_gib": None,
                               "losses": [5.0, 5.0, 5.0]}
    assert summarize([*rows, {**rows[0], "step": 4, "tokens": 4000, "tokens_per_s": 250.0}])["step_s"] == 4.0
    with pytest.raises(ValueError, match="no step of metrics.jsonl has a tokens_per_s"):
        summarize([{**r, "tokens_per_s": None} for r in rows])


def test_a_run_without_a_rate_is_a_failed_row(tmp_path, monkeypatch):
    """The summary's error is the point's failed row; the benchmark goes on to its next point."""
    import subprocess
    from types import SimpleNamespace

    from train import bench

    def finished_run(cmd, timeout):
        run_dir = tmp_path / "runs" / "256_full_sp1"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 256, "tokens_per_s": 0.0,
                                                           "mfu": None, "mem_gb": None, "loss": 7.0}) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench, "run_group", finished_run)
    args = SimpleNamespace(run_root=str(tmp_path / "runs"), steps=1, model="tiny", documents="module", profile=False,
                           packing="concat", timeout=60)
    row = bench.run_point(parse_point("256:full"), args, [])
    assert row["ok"] is False and row["error"] == "no step of metrics.jsonl has a tokens_per_s"


def test_the_table_names_a_command_that_runs_as_written(tmp_path, monkeypatch):
    """The heading's command is quoted: joined with spaces, ``--json ''`` read ``--json`` (followed by the next
    option) and a path with a space became two arguments; ``--output`` and ``--json`` are left out."""
    import shlex

    from train import bench

    monkeypatch.setattr(bench, "run_point", lambda p, args, extra: {
        **p, "packing": args.packing, "ok": True, "error": None, "tokens_per_s": 10.0, "step_s": 1.0, "mfu": None,
        "peak_gib": None, "losses": [5.0]})
    md = tmp_path / "B.md"
    argv = ["--points", "256:full", "--model", "tiny", "--run-root", str(tmp_path / "a b"), "--output", str(md),
            "--json", ""]
    assert main(argv) == 0
    heading = next(line for line in md.read_text().splitlines() if line.startswith("Training benchmark"))
    # where the results go is left out: the command reproduces the table into the checkout's own files
    assert shlex.split(heading.split("`")[1]) == ["python", "-m", "train.bench", "--points", "256:full",
                                                  "--model", "tiny", "--run-root", str(tmp_path / "a b")]


def test_the_1b_benchmark_on_a_cpu_stops_with_the_cpu_trial_command(tmp_path, capsys):
    """``make bench-train`` on a CPU used to start the 1B model at 128K tokens (hundreds of GiB)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["--run-root", str(tmp_path), "--output", "", "--json", ""]) == 2
    err = capsys.readouterr().err
    assert "--model llama_1b needs a CUDA device" in err and "--model tiny" in err
    assert not any(tmp_path.iterdir())


def test_shown_command_drops_only_the_output_files():
    from train.bench import shown_command

    args = ["--points", "8192:512:3", "--output", "out/B.md", "--json=out/k.json", "--reps", "3", "--", "x=a b"]
    assert shown_command("train.bench_kernels", args) == (
        "python -m train.bench_kernels --points 8192:512:3 --reps 3 -- 'x=a b'")
    assert shown_command("train.bench", []) == "python -m train.bench"


def test_a_cpu_run_has_no_peak_memory():
    """On a CPU every ``mem_gb`` is null (there is no CUDA peak): the table printed 0.0 GiB and the JSON said 0.0."""
    from train.bench import summarize, table

    rows = [{"step": i + 1, "tokens": 100 * (i + 1), "tokens_per_s": 50.0, "mfu": None, "mem_gb": None, "loss": 5.0}
            for i in range(3)]
    got = summarize(rows)
    assert got["peak_gib"] is None
    point = {**parse_point("256:full"), **got, "ok": True, "error": None}
    assert "| 256 | 1 | full | 50 | 2.00 |  | n/a | - | 5.000, 5.000, 5.000 |" in table([point], "cmd", "cpu")
    gpu = {**point, "peak_gib": 21.96}  # a CUDA row keeps its figure
    assert "| n/a | 22.0 | 5.000" in table([gpu], "cmd", "NVIDIA H200")


def test_a_point_stopped_by_a_signal_is_a_failed_row(tmp_path, monkeypatch):
    """``python -m train`` stopped by a signal exits 128 + its number (the launcher then 1) with the steps it
    made in metrics.jsonl: the row is failed and names the stop, not ``exit 1``, and nothing raises."""
    import subprocess
    from types import SimpleNamespace

    from train import bench

    def stopped_run(cmd, timeout):
        run_dir = tmp_path / "runs" / "256_full_sp1"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 256, "tokens_per_s": 10.0,
                                                           "mfu": None, "mem_gb": None, "loss": 7.0}) + "\n")
        out = ("[2026-11-30 10:00:00,000][train.loop][WARNING] - stopped by a signal at step 1 (SIGTERM): "
               "checkpoint.enabled=false: nothing saved, so python -m train ... starts from scratch; exit status 143\n")
        err = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        return subprocess.CompletedProcess(cmd, 1, out, err)

    monkeypatch.setattr(bench, "run_group", stopped_run)
    args = SimpleNamespace(run_root=str(tmp_path / "runs"), steps=3, model="tiny", documents="module", profile=False,
                           packing="concat", timeout=60)
    row = bench.run_point(parse_point("256:full"), args, [])
    assert row["ok"] is False and row["error"] == "stopped by a signal at step 1 (SIGTERM)"
    assert bench.failure_reason("", "stopped by a signal at step 4 before the HF export (SIGINT): the last "
                                    "checkpoint is c") == "stopped by a signal at step 4 before the HF export (SIGINT)"


def test_cpu_run_writes_rows_and_table_and_reruns_into_the_same_root(tmp_path, small_corpus):
    md, js, root = tmp_path / "B.md", tmp_path / "train.json", tmp_path / "runs"
    md.write_text("# Benchmarks\n\nkept text\n")
    small = [a for a in SMALL if not a.startswith(("data.seq_len", "moba.", "train.micro_batch_size"))]
    args = ["--points", "256:full,256:32:2,256:33:2", "--steps", "3", "--model", "tiny", "--run-root", str(root),
            "--output", str(md), "--json", str(js), "--timeout", "300", "--", *small, *small_data_args(small_corpus)]
    assert main(args) == 1  # block size 33 is refused (not a multiple of 16): that row fails, the others stand
    rows = json.loads(js.read_text())
    assert [(r["seq_len"], r["attention"], r["moba"], r["ok"]) for r in rows] == [
        (256, "full", None, True), (256, "moba", "32:2", True), (256, "moba", "33:2", False)]
    full, moba, bad = rows
    assert bad["error"] == "error: moba.block_size=33 must be a positive multiple of 16"
    for r in (full, moba):
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu"] is None  # CPU
        assert r["gpu"] == "cpu" and r["date"] and r["gpus"] == 1
        assert r["peak_gib"] is None  # no CUDA peak on a CPU (it said 0.0)
        assert r["packing"] == "best_fit"  # the default
    assert json.loads((root / "256_full_sp1" / "config.json").read_text())["data"]["packing"] == "best_fit"
    assert not list(root.glob("*/checkpoints/step_*"))  # checkpoint.enabled=false
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n") and text.count(MARK_BEGIN) == text.count(MARK_END) == 1
    assert f"| 256 | 1 | MoBA 32:2 | {moba['tokens_per_s']:,.0f} | {moba['step_s']:.2f} | " \
           f"{full['step_s'] / moba['step_s']:.2f}x | n/a | - |" in text
    # the same root again: run directories are replaced (no resume=none refusal), rows replaced, not added
    assert main([*args[:1], "256:full", *args[2:]]) == 0
    assert [r["moba"] for r in json.loads(js.read_text())] == [None, "32:2", "33:2"]


# A launcher as torch.distributed.run: its worker runs in a session of its own (out of reach of a signal to the
# launcher's group) and is stopped by the launcher when the launcher gets SIGTERM. A SIGKILL of the launcher
# alone (subprocess.run's timeout) left the worker running.
WORKER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
FORWARDING_LAUNCHER = """import signal, subprocess, sys, time
w = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], start_new_session=True)
signal.signal(signal.SIGTERM, lambda *a: (w.terminate(), w.wait(), sys.exit(1)))
time.sleep(120)"""
# A launcher that forwards nothing (its worker in its group): the group is killed after the grace period.
DEAF_LAUNCHER = """import signal, subprocess, sys, time
subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)"""


@pytest.mark.parametrize("launcher", [FORWARDING_LAUNCHER, DEAF_LAUNCHER], ids=["forwarding", "deaf"])
def test_a_point_past_its_timeout_is_stopped_with_its_workers(tmp_path, launcher):
    import sys
    import time
    from pathlib import Path

    from train.bench import run_group

    pid_file = tmp_path / "worker.pid"
    start = time.monotonic()
    assert run_group([sys.executable, "-c", launcher, WORKER, str(pid_file)], timeout=5, grace=3) is None
    assert time.monotonic() - start < 30
    pid = int(pid_file.read_text())

    def running():  # a killed process not yet reaped (zombie, state Z) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    for _ in range(50):
        if not running():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {pid} still runs")
    done = run_group([sys.executable, "-c", "print('ok')"], timeout=30)
    assert done.returncode == 0 and done.stdout == "ok\n"
