"""Training benchmark (``make bench-train``): tokens/s, MFU and peak memory of real training steps, MoBA against
full attention, on long documents, up to the longest context that trains.

    python -m train.bench                                   # the default points, one GPU
    python -m train.bench --points 1048576:512:8@sp2        # one sequence over two GPUs (sequence parallel)
    python -m train.bench --points 32768:full,32768:512:8 --steps 6 -- model.fused_ops=false
    python -m train.bench --points 32768:full@nockpt        # without activation checkpointing
    python -m train.bench --points 131072:full@keepattn     # checkpointing that keeps the attention outputs
    python -m train.bench --points 131072:512:8@keeproute   # checkpointing that keeps MoBA's routing

A point is ``SEQ_LEN:full`` or ``SEQ_LEN:BLOCK:TOP_K`` (MoBA in every layer), with ``@spN`` for one sequence
over N GPUs, ``@nockpt`` for a run without activation checkpointing (which the others use), ``@keepattn`` for
checkpointing that keeps the attention outputs (``train.recompute_attention=false``) and ``@keeproute`` (MoBA points)
for checkpointing that keeps MoBA's routing (``train.recompute_routing=false``). Every point is
one ``python -m torch.distributed.run -m train`` run of the real loop (data, DeepSpeed step, logging) of
``--model`` (the 1B Llama shape) on ``--documents`` (``package``: long documents) packed by ``--packing``
(``best_fit``: a document is cut only where it is longer than ``seq_len``, so long documents give samples of
one document), with ``BASE_OVERRIDES`` (no checkpoint written) and the overrides after ``--`` (which may not set
what a point, ``--steps``, ``--model``, ``--documents`` or ``--packing`` fixes: ``POINT_KEYS``).
Tokens/s, step time and MFU are over the steps after the first two (compilation, warm-up), taken together:
all their tokens over all their time, the mean step time, and the FLOPs over the time (samples differ: a
sample of one 128K document costs full attention about four times one of short documents, while MoBA costs
about the same; every point of a run sees the same samples in the same steps, so "vs full" compares equal
work). Memory is the CUDA peak of the run (none on a CPU). A run that fails (out of memory included) or is
stopped by a signal is a row with ``ok: false``.

Output: the table printed and written into ``--output`` (``BENCHMARKS.md``) between marker comments, and the rows
into ``--json`` (``results/train.json``: a list of objects with ``seq_len``, ``attention`` (full | moba), ``moba``
("512:8" or null), ``gpus``, ``activation_checkpointing`` (absent in rows written before it existed: true),
``recompute_attention`` and ``recompute_routing`` (likewise: true), ``packing`` (absent in rows written before it
existed: concat), ``tokens_per_s``, ``step_s``, ``mfu``, ``peak_gib`` (peak CUDA memory; null on a CPU, where the
table shows "-"), ``ok``, ``error``, ``losses``, ``gpu``, ``date``; with ``--profile`` also ``profile_ms``: an extra
step's wall, idle and per-part GPU time, ``train.profiling``), where rows of the same (seq_len, attention, moba,
gpus, activation_checkpointing, packing, recompute_attention, recompute_routing) are replaced and the others kept,
so one-GPU and two-GPU runs add up.
Each point's run directory under ``--run-root`` is replaced, so reruns into the same root work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from .sweep import override_key

MARK_BEGIN, MARK_END = "<!-- train-bench:begin -->", "<!-- train-bench:end -->"
DEFAULT_POINTS = ("32768:full,32768:512:8,32768:4096:12,32768:full@nockpt,32768:512:8@nockpt,"
                  "131072:full,131072:512:8,131072:4096:12,262144:512:8,524288:512:8,1048576:512:8")
# The 1B Llama shape on long documents; lr 3e-4 warmed up over all the benchmark's steps (a fresh 1B model
# at 1e-3 after two warm-up steps jumps from loss 8 to 11).
BASE_OVERRIDES = ["train.micro_batch_size=1", "train.grad_accum=1", "parallel.zero_stage=0",
                  "optim.lr=3e-4", "checkpoint.enabled=false", "checkpoint.export_hf=false",
                  "logging.wandb.mode=disabled", "train.eval_every=0", "train.eval_batches=1"]


def parse_point(text: str) -> dict:
    """``SEQ_LEN:full`` | ``SEQ_LEN:BLOCK:TOP_K``, optionally ``@spN``, and one of ``@nockpt`` (no activation
    checkpointing), ``@keepattn`` (checkpointing that keeps the attention outputs: ``train.recompute_attention=false``)
    or, for MoBA, ``@keeproute`` (checkpointing that keeps the routing: ``train.recompute_routing=false``) ->
    ``{seq_len, attention, moba, gpus, activation_checkpointing, recompute_attention, recompute_routing}``.

    Raises:
        ValueError: naming the point when it is not of that form.
    """
    body, *tags = text.strip().split("@")
    parts = body.split(":")
    try:
        sp = [t for t in tags if t.startswith("sp")]
        gpus = int(sp[0][2:]) if sp else 1
        modes = set(tags) - set(sp)
        if (len(sp) > 1 or gpus < 1 or len(tags) != len(set(tags)) or modes - {"nockpt", "keepattn", "keeproute"}
                or len(modes) > 1 or ("keeproute" in modes and parts[1:] == ["full"])):
            raise ValueError
        p = {"seq_len": int(parts[0]), "gpus": gpus, "activation_checkpointing": "nockpt" not in tags,
             "recompute_attention": "keepattn" not in tags, "recompute_routing": "keeproute" not in tags}
        if parts[1:] == ["full"]:
            return {**p, "attention": "full", "moba": None}
        block, top_k = (int(x) for x in parts[1:])
        return {**p, "attention": "moba", "moba": f"{block}:{top_k}"}
    except ValueError:
        raise ValueError(f"--points: {text!r} is not SEQ_LEN:full or SEQ_LEN:BLOCK:TOP_K (optionally @spN, "
                         "and one of @nockpt, @keepattn or, for MoBA, @keeproute)") from None


def row_key(r: dict) -> tuple:
    """What names a point's row: (seq_len, attention, moba, gpus, activation_checkpointing, packing,
    recompute_attention, recompute_routing); rows written before the last four fields existed ran with
    checkpointing (recomputing attention and routing) and concat packing."""
    return (r["seq_len"], r["attention"], r["moba"], r["gpus"], r.get("activation_checkpointing", True),
            r.get("packing", "concat"), r.get("recompute_attention", True), r.get("recompute_routing", True))


def full_key(r: dict) -> tuple:
    """The full-attention row a row's "vs full" compares with: same length, GPUs, checkpointing, packing and
    attention recompute (``row_key`` less attention, moba and recompute_routing, which full attention does not
    have)."""
    return row_key(r)[:1] + row_key(r)[3:7]


def point_label(r: dict) -> str:
    """The attention column of the tables: "full" or "MoBA 512:8", and "(no ckpt)" without checkpointing,
    "(attention kept)" with checkpointing that keeps the attention outputs or "(routing kept)" with checkpointing
    that keeps MoBA's routing."""
    key = row_key(r)
    return ((f"MoBA {r['moba']}" if r["moba"] else "full") + ("" if key[4] else " (no ckpt)")
            + ("" if key[6] else " (attention kept)") + ("" if key[7] else " (routing kept)"))


def point_name(p: dict) -> str:
    return (f"{p['seq_len']}_{p['moba'].replace(':', '-') if p['moba'] else 'full'}_sp{p['gpus']}"
            + ("" if row_key(p)[4] else "_nockpt") + ("" if row_key(p)[6] else "_keepattn")
            + ("" if row_key(p)[7] else "_keeproute"))


def point_overrides(p: dict, steps: int, model: str = "llama_1b", documents: str = "package",
                    profile: bool = False, packing: str = "best_fit") -> list[str]:
    """The ``python -m train`` overrides of a point (before the user's); ``profile``: one step more, step
    ``steps + 1``, runs under ``torch.profiler`` (``train.profile_step``), so the step figures (which leave the
    profiled step out) cover the same samples as a run without ``--profile``. The learning rate warms up over
    ``steps`` either way."""
    out = [f"model={model}", f"data.documents={documents}", f"data.packing={packing}", *BASE_OVERRIDES,
           f"data.seq_len={p['seq_len']}",
           f"train.max_steps={steps + profile}", f"optim.warmup_steps={steps}", f"parallel.sp_size={p['gpus']}",
           f"train.activation_checkpointing={str(row_key(p)[4]).lower()}",
           f"train.recompute_attention={str(row_key(p)[6]).lower()}",
           f"train.recompute_routing={str(row_key(p)[7]).lower()}", "moba.full_attn_layers=[]",
           f"train.profile_step={steps + 1 if profile else 0}"]
    if p["attention"] == "full":
        return [*out, "schedule=full"]
    block, top_k = p["moba"].split(":")
    return [*out, "schedule=moba", f"moba.block_size={block}", f"moba.top_k={top_k}"]


# Settings a point (or --model / --documents / --steps) fixes: given after ``--`` they would silently replace the
# point's own values, and the row would name a run that did not happen.
POINT_KEYS = {"data.seq_len": "--points", "moba.block_size": "--points", "moba.top_k": "--points",
              "moba.full_attn_layers": "--points", "moba.layers": "--points", "parallel.sp_size": "--points (@spN)",
              "schedule": "--points", "train.activation_checkpointing": "--points (@nockpt)",
              "train.recompute_attention": "--points (@keepattn)", "train.recompute_routing": "--points (@keeproute)",
              "train.max_steps": "--steps", "model": "--model", "data.documents": "--documents",
              "data.packing": "--packing", "train.profile_step": "--profile"}


def check_extra(extra: list[str]) -> None:
    """Refuse overrides after ``--`` that set a setting of ``POINT_KEYS`` (or a ``schedule.*`` field).

    Raises:
        ValueError: naming the override and the option that sets it.
    """
    for o in extra:
        key = override_key(o)
        flag = POINT_KEYS.get(key) or ("--points" if key.startswith("schedule.") else None)
        if flag:
            raise ValueError(f"override {o!r} after -- would replace the benchmark's own {key}: set it with {flag}")


def summarize(rows: list[dict]) -> dict:
    """The steps after the first two (all steps when there are fewer) of ``metrics.jsonl`` rows taken together:
    tokens/s of the job (all GPUs) = their tokens over their time, the mean seconds per step, and MFU = their
    FLOPs over their time (each step's MFU weighted by its time); the peak memory and every loss. A step's time
    is its tokens (``tokens`` / ``step``: ``tokens`` counts the run's tokens so far) over its tokens/s. Totals,
    not medians: the samples of a run differ (one long document or many short ones), and a median picks one
    sample's time. A step run under the profiler (``profiled``) is left out, unless it is the only step, and so
    is a step without a rate (tokens/s 0 or null: no time to count). The peak is None when no row has a memory
    figure (a CPU run: ``mem_gb`` is CUDA's peak, null elsewhere).

    Raises:
        ValueError: no step has a tokens/s.
    """
    rated = [r for r in rows if r.get("tokens_per_s")]
    steady = ([r for r in rows[2:] if r.get("tokens_per_s") and not r.get("profiled")]
              or [r for r in rated if not r.get("profiled")] or rated)
    if not steady:
        raise ValueError("no step of metrics.jsonl has a tokens_per_s")
    tokens = [r["tokens"] / r["step"] for r in steady]
    secs = [n / r["tokens_per_s"] for n, r in zip(tokens, steady)]
    with_mfu = [(r["mfu"], s) for r, s in zip(steady, secs) if r.get("mfu") is not None]
    mem = [r["mem_gb"] for r in rows if r.get("mem_gb") is not None]
    return {"tokens_per_s": sum(tokens) / sum(secs), "step_s": statistics.mean(secs),
            "mfu": sum(m * s for m, s in with_mfu) / sum(s for _, s in with_mfu) if with_mfu else None,
            "peak_gib": max(mem) if mem else None, "losses": [r["loss"] for r in rows]}


STOPPED_RE = re.compile(r"stopped by a signal at step \d+(?: before the [\w ]+?)? \((?:SIG)?\w+\)")


def failure_reason(stderr: str, stdout: str = "") -> str | None:
    """``out of memory``; else, for a run stopped by a signal (``python -m train`` then exits 128 + its number),
    its log line's start (``stopped by a signal at step 3 (SIGTERM)``, from either stream); else the first
    ``error: ...`` line (a bad setting) or exception line of a failed run's stderr (``ValueError: ...``; not the
    launcher's ``ChildFailedError``), cut to 200 characters."""
    if "out of memory" in stderr.lower() or "OutOfMemoryError" in stderr:
        return "out of memory"
    stopped = STOPPED_RE.search(stdout + "\n" + stderr)
    if stopped:
        return stopped.group(0)
    for line in stderr.splitlines():
        # ``error: ...``: a bad setting as python -m train prints it (ConfigError); else an exception's line
        if (line.lstrip().startswith("error: ") or re.match(r"^[\w.]*(Error|Exception): \S", line)) \
                and "ChildFailedError" not in line:
            return line.strip()[:200]
    return None


def run_group(cmd: list[str], timeout: float, grace: float = 60.0) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` (output captured) in a process group of its own; None when it ran past ``timeout`` seconds.

    On a timeout or an interruption the launcher gets SIGTERM, on which ``torch.distributed.run`` stops its
    workers (they run in sessions of their own: killing the launcher alone, as before, left them training
    beside the next point), then, after ``grace`` seconds, the launcher's group gets SIGKILL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C (which the new session no longer passes on)
        proc.terminate()
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_point(p: dict, args, extra: list[str]) -> dict:
    """Train one point in a fresh run directory; its row of ``results/train.json`` (``ok`` false on failure)."""
    run_dir = Path(args.run_root) / point_name(p)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p["gpus"]),
           "-m", "train", f"hydra.run.dir={run_dir}",
           *point_overrides(p, args.steps, args.model, args.documents, args.profile, args.packing),
           *extra]
    print("+", " ".join(cmd), flush=True)
    row = {**p, "packing": args.packing, "ok": False, "error": None}
    proc = run_group(cmd, args.timeout)
    if proc is None:
        return {**row, "error": f"timed out after {args.timeout} s"}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
        return {**row, "error": failure_reason(proc.stderr, proc.stdout) or f"exit {proc.returncode}"}
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    try:
        row = {**row, **summarize(rows), "ok": True}
    except ValueError as e:
        return {**row, "error": str(e)}
    from .profiling import summary_path

    prof = summary_path(run_dir, args.steps + 1)  # the extra step point_overrides adds under --profile
    if args.profile and prof.is_file():
        split = json.loads(prof.read_text())
        row["profile_ms"] = {"wall": split["wall_ms"], "idle": split["idle_ms"], **split["categories_ms"]}
    return row


def table(results: list[dict], command: str, gpu: str) -> str:
    """The markdown section: one row per point, and MoBA's step-time speed-up over full attention run the same
    way (``full_key``: length, GPUs, checkpointing, packing, attention recompute)."""
    full = {full_key(r): r for r in results if r["ok"] and r["attention"] == "full"}
    packings = sorted({row_key(r)[5] for r in results})
    lines = [f"Training benchmark, {datetime.date.today()}, {gpu}, {'/'.join(packings)} packing: `{command}`", "",
             "| seq_len | GPUs | attention | tokens/s | step s | vs full | MFU | peak GiB | losses (first 3) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        attn = point_label(r)
        if not r["ok"]:
            lines.append(f"| {r['seq_len']} | {r['gpus']} | {attn} | failed: {r['error']} | | | | | |")
            continue
        f = full.get(full_key(r))
        speed = f"{f['step_s'] / r['step_s']:.2f}x" if f and r["moba"] else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"  # None: no CUDA peak (a CPU run)
        losses = ", ".join(f"{x:.3f}" for x in r["losses"][:3])
        lines.append(f"| {r['seq_len']} | {r['gpus']} | {attn} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | "
                     f"{speed} | {mfu} | {peak} | {losses} |")
    profiled = [r for r in results if r.get("profile_ms")]
    if profiled:
        from .profiling import CATEGORIES

        lines += ["", "One step under torch.profiler (one step after the measured ones; kernel time per part in ms, "
                  "its share of the kernel time, and idle = wall - kernel time; recompute counted where it runs; on a "
                  "CPU the operators' self times, a rough split):", "",
                  "| seq_len | GPUs | attention | wall ms | " + " | ".join(CATEGORIES) + " | idle |",
                  "|---|---|---|---|" + "---|" * (len(CATEGORIES) + 1)]
        for r in profiled:
            pm = r["profile_ms"]
            busy = sum(pm[c] for c in CATEGORIES) or 1.0
            cells = " | ".join(f"{pm[c]:.0f} ({100 * pm[c] / busy:.0f}%)" for c in CATEGORIES)
            lines.append(f"| {r['seq_len']} | {r['gpus']} | {point_label(r)} | {pm['wall']:.0f} | {cells} | "
                         f"{pm['idle']:.0f} |")
    return "\n".join(lines) + "\n"


def replace_marked_section(path: Path, begin: str, end: str, text: str, heading: str = "") -> None:
    """Write ``text`` between the markers ``begin`` / ``end`` of the markdown file ``path`` (replacing what was
    there), or append it (after ``heading``) when the markers are absent; other sections are kept."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip(chr(10))}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + (heading + "\n\n" if heading else "") + block + "\n"
    path.write_text(new)


def merge_json(path: Path, rows: list[dict]) -> list[dict]:
    """``path``'s rows with those of the same ``row_key`` replaced by ``rows``."""
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {row_key(r) for r in rows}
    merged = [r for r in old if row_key(r) not in new_keys] + rows
    merged.sort(key=lambda r: (r["gpus"], r["seq_len"], row_key(r)[5], not row_key(r)[4], not row_key(r)[6],
                               not row_key(r)[7],
                               r["attention"] == "moba", r["moba"] or ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def shown_command(module: str, args: list[str]) -> str:
    """The command line a benchmark table names: ``python -m <module>`` and ``args`` quoted as written, without
    ``--output`` / ``--json`` and their values (where the results are written does not change them), so the
    command reproduces the table into the checkout's own files."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--output", "--json"):
            skip = True
        elif not a.startswith(("--output=", "--json=")):
            kept.append(a)
    return f"python -m {module} {shlex.join(kept)}".strip()


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    extra = raw[raw.index("--") + 1:] if "--" in raw else []
    argv = raw[: raw.index("--")] if "--" in raw else raw
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="Overrides for every run follow --, e.g. -- model.fused_ops=false.")
    ap.add_argument("--points", default=DEFAULT_POINTS,
                    help="comma list of SEQ_LEN:full | SEQ_LEN:BLOCK:TOP_K, each optionally @spN, and one of "
                         "@nockpt, @keepattn or (MoBA) @keeproute")
    ap.add_argument("--steps", type=int, default=10,
                    help="training steps per point (tokens/s, step time and MFU over steps 3.. together: the first "
                         "steps compile kernels and build cuDNN plans for new document lengths)")
    ap.add_argument("--model", default="llama_1b", help="the model group (configs/model/<name>.yaml)")
    ap.add_argument("--documents", default="package", help="data.documents: package (long documents) | module")
    ap.add_argument("--packing", default="best_fit", choices=("best_fit", "concat", "pad"),
                    help="data.packing: best_fit (a document is cut only where it is longer than seq_len) | concat "
                         "(documents end to end, cut at every sample boundary) | pad")
    ap.add_argument("--run-root", default="runs/bench")
    ap.add_argument("--output", default="BENCHMARKS.md", help="markdown file with the marked section ('' = none)")
    ap.add_argument("--json", default="results/train.json", help="rows merged into this file ('' = none)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per point before it counts as failed")
    ap.add_argument("--profile", action="store_true",
                    help="run one step more under torch.profiler (train.profile_step; the step figures leave it "
                         "out): its time split into attention, matmul, loss, optimizer, ... as a second table and "
                         "profile_ms in the JSON rows")
    args = ap.parse_args(argv)
    try:
        points = [parse_point(t) for t in args.points.split(",") if t.strip()]
        if not points:
            raise ValueError(f"--points {args.points!r} names no point")
        names = [point_name(p) for p in points]
        if len(set(names)) < len(names):
            raise ValueError(f"--points {args.points!r} names a point twice")
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps} must be >= 1")
        if args.timeout <= 0:
            raise ValueError(f"--timeout {args.timeout} must be > 0 seconds")
        check_extra(extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and args.model != "tiny":
        print(f"error: python -m train.bench --model {args.model} needs a CUDA device (its default points train a "
              "1B model at 32K-1M tokens); on a CPU try --model tiny --steps 3 "
              "--points 256:full@nockpt,256:32:2@nockpt --output '' --json ''", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("WANDB_MODE", "disabled")
    command = shown_command("train.bench", raw)
    results = []
    for p in points:
        results.append({**run_point(p, args, extra),
                        "gpu": gpu, "date": datetime.date.today().isoformat()})
        text = table(results, command, gpu)  # rewritten after every point: a cut run keeps its rows
        if args.output:
            replace_marked_section(Path(args.output), MARK_BEGIN, MARK_END, text, "## Training")
        if args.json:
            merge_json(Path(args.json), results)
        print(text, flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
