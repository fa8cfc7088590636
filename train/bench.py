"""Training benchmark: tokens/s, MFU and peak memory of real training steps, MoBA against full attention and
sequence parallelism 1 against 2, plus the loss equivalence of sp=1 and sp=2 (same data and seed).

    python -m train.bench --seq-len 32768 --variants sp1:moba,sp2:moba,sp1:full --steps 8 \\
        --out BENCHMARKS.md -- model=llama_1b train.activation_checkpointing=true

Every variant is one ``python -m torch.distributed.run -m train`` run (so it measures the real loop:
data, DeepSpeed step, logging); tokens/s and MFU are medians over the steps after the first two
(warm-up, kernel compilation); memory is the peak over the run. Results go to a table printed last and,
with ``--out``, into a marked section of that markdown file (replaced on rerun).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MARK_BEGIN, MARK_END = "<!-- train-bench:begin -->", "<!-- train-bench:end -->"


def run_variant(name: str, nproc: int, schedule: str, args, extra: list[str], run_root: Path) -> dict:
    run_dir = run_root / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "train", f"hydra.run.dir={run_dir}", "resume=none", f"schedule={schedule}",
           f"parallel.sp_size={nproc if name.startswith('sp') else 1}", f"data.seq_len={args.seq_len}",
           f"train.max_steps={args.steps}", "checkpoint.every=1000000", "checkpoint.export_hf=false",
           "logging.wandb.mode=disabled", "train.eval_batches=1", "optim.warmup_steps=2", *extra]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], flush=True)
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steady = rows[2:] or rows
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "name": name, "gpus": nproc, "schedule": schedule,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s"] for r in steady) / nproc,
        "mfu": statistics.median(mfu) if mfu else None,
        "mem_gb": max((r.get("mem_gb") or 0.0) for r in rows),
        "losses": [r["loss"] for r in rows],
    }


def table(results: list[dict], args, extra: list[str]) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = [
        f"Training benchmark, {datetime.date.today()}, {gpu}, seq_len {args.seq_len}, overrides `{' '.join(extra)}`",
        "",
        f"Command: `python -m train.bench --seq-len {args.seq_len} --variants {args.variants} --steps {args.steps}"
        f" -- {' '.join(extra)}`",
        "",
        "| variant | GPUs | attention | tokens/s | tokens/s/GPU | MFU | peak mem (GiB) | losses (steps 1-3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | error: {r['error'][:80]} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        losses = ", ".join(f"{x:.5f}" for x in r["losses"][:3])
        lines.append(f"| {r['name']} | {r['gpus']} | {r['schedule']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {mfu} | {r['mem_gb']:.1f} | {losses} |")
    by = {r["name"]: r for r in results if "error" not in r}
    if "sp1:moba" in by and "sp2:moba" in by:
        a, b = by["sp1:moba"]["losses"][:3], by["sp2:moba"]["losses"][:3]
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        lines += ["", f"sp=2 vs sp=1 (MoBA, same data and seed): largest relative loss difference over steps 1-3: "
                      f"{rel:.2e} (bf16)"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{text}{MARK_END}\n"
    if MARK_BEGIN in old and MARK_END in old:
        new = old[: old.index(MARK_BEGIN)] + block + old[old.index(MARK_END) + len(MARK_END) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n## Training\n\n" + block
    path.write_text(new)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--variants", default="sp1:moba,sp2:moba,sp1:full",
                   help="comma list of <sp|dp><n>:<moba|full>: sp2 = one sequence over 2 GPUs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--run-root", default="runs/bench")
    p.add_argument("--out", default=None, help="markdown file to write the table into (marked section)")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    results = []
    for v in args.variants.split(","):
        layout, schedule = v.split(":")
        nproc = int(layout[2:])
        results.append(run_variant(v, nproc, schedule, args, extra, Path(args.run_root)))
    text = table(results, args, extra)
    if args.out:
        write_section(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
