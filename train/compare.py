"""``python -m train.compare RUN_DIR...``: compare training runs (or the jobs of a sweep) side by side.

    python -m train.compare multirun/2026-11-30/03-20-00          # every job of a sweep
    python -m train.compare runs/b128 runs/b256 --out results/b   # any run directories

For each run: the settings of a sweep (its swept keys, as its jobs' config.json record them) and every
other setting that differs between the runs, the number of steps, the final and best validation loss, the
final trailing-token loss (``val_loss_tail``: tokens in the second half of long documents), the last
training loss, the median tokens/s over the logged steps (the first step, which includes compilation and
warm-up, is left out when there are others) and the peak GPU memory. The table is printed and written as
``compare.md``; the loss curves (training loss per step, validation loss per evaluation) as
``compare.png``, both into ``--out`` (default: the sweep directory when one is given, else the runs'
common parent directory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from .metrics import read_records
from .rundir import flatten

# Keys of config.json that are records of a launch, not settings to compare.
NOT_SETTINGS = ("overrides", "sweep", "data_identity", "logging.wandb.name", "checkpoint.dir")
LABEL_MAX = 60  # characters of a legend entry; a longer one is replaced by the run's folder name


def is_run_dir(path: Path) -> bool:
    """A directory ``python -m train`` wrote: it holds ``config.json`` or ``metrics.jsonl``."""
    return (path / "config.json").is_file() or (path / "metrics.jsonl").is_file()


def _job_order(path: Path):
    m = re.match(r"(\d+)", path.name)
    return (0, int(m.group(1)), path.name) if m else (1, 0, path.name)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories named by ``paths``: a run directory itself, or a directory (a sweep) whose
    subdirectories are runs, in job-number order.

    Raises:
        ValueError: a path that is neither.
    """
    runs = []
    for p in map(Path, paths):
        if is_run_dir(p):
            runs.append(p)
            continue
        jobs = sorted((d for d in p.iterdir() if d.is_dir() and is_run_dir(d)), key=_job_order) if p.is_dir() else []
        if not jobs:
            raise ValueError(f"RUN_DIR {p} is neither a run directory (config.json, metrics.jsonl) nor a sweep of them")
        runs.extend(jobs)
    return runs


def load_run(run_dir: Path) -> dict:
    """``{"dir", "config" (flattened config.json, {} if missing), "swept" (a sweep job's swept keys),
    "metrics", "evals"}`` of one run directory."""
    cfg_file = run_dir / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    sweep = config.get("sweep") or {}
    return {
        "dir": run_dir,
        "config": flatten({k: v for k, v in config.items() if k not in ("overrides", "sweep")}),
        "swept": dict(sweep.get("swept") or {}),
        "metrics": read_records(run_dir / "metrics.jsonl"),
        "evals": read_records(run_dir / "eval.jsonl"),
    }


def compared_settings(runs: list[dict]) -> list[str]:
    """The settings to show: the keys the runs' sweeps swept, then every other setting whose value differs
    between the runs (a key under a swept config group, e.g. ``model.*`` when ``model`` was swept, is left
    out: the group's choice shows it)."""
    swept = list(dict.fromkeys(k for r in runs for k in r["swept"]))
    keys = sorted({k for r in runs for k in r["config"]})
    differ = [k for k in keys if k not in swept and not k.startswith(NOT_SETTINGS)
              and not any(k.startswith(g + ".") for g in swept)
              and len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]
    return swept + differ


def setting(run: dict, key: str):
    """A run's value of ``key``: from its config, else (a swept config group such as ``model``) its sweep."""
    return run["config"][key] if key in run["config"] else run["swept"].get(key)


def summarise(run: dict) -> dict:
    """The numbers of one run: steps, final / best validation loss (and the best one's step), final
    trailing-token loss, last training loss, median tokens/s, peak memory (GB; None on a CPU)."""
    m, e = run["metrics"], [x for x in run["evals"] if x.get("val_loss") is not None]
    speeds = [x["tokens_per_s"] for x in m if x.get("tokens_per_s") is not None]
    if len(speeds) > 1:
        speeds = speeds[1:]  # the first step carries compilation and warm-up
    mems = [x["mem_gb"] for x in m if x.get("mem_gb") is not None]
    best = min(e, key=lambda x: x["val_loss"]) if e else None
    return {
        "steps": m[-1]["step"] if m else 0,
        "final_val_loss": e[-1]["val_loss"] if e else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_step": best["step"] if best else None,
        "val_loss_tail": e[-1].get("val_loss_tail") if e else None,
        "train_loss": m[-1]["loss"] if m else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_mem_gb": max(mems) if mems else None,
    }


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def label(run: dict, settings: list[str]) -> str:
    """A run's name in the legend: its compared settings (``moba.block_size=64``), else its folder."""
    name = ", ".join(f"{k}={_fmt(setting(run, k), '.6g')}" for k in settings)
    return name if name and len(name) <= LABEL_MAX else run["dir"].name


def markdown_table(runs: list[dict], settings: list[str]) -> str:
    """The comparison as a markdown table, one row per run."""
    head = ["run", *settings, "steps", "final val_loss", "best val_loss (step)", "val_loss_tail", "train loss",
            "tokens/s", "peak mem (GB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = summarise(r)
        best = "n/a" if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f} ({s['best_step']})"
        row = [r["dir"].name, *(_fmt(setting(r, k), ".6g") for k in settings), str(s["steps"]),
               _fmt(s["final_val_loss"]), best, _fmt(s["val_loss_tail"]), _fmt(s["train_loss"]),
               _fmt(s["tokens_per_s"], ".0f"), _fmt(s["peak_mem_gb"], ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], settings: list[str], out_png: Path) -> None:
    """Training loss per step (left) and validation loss per evaluation (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        name = label(r, settings)
        m = [x for x in r["metrics"] if x.get("loss") is not None]
        ax_t.plot([x["step"] for x in m], [x["loss"] for x in m], label=name)
        e = [x for x in r["evals"] if x.get("val_loss") is not None]
        ax_v.plot([x["step"] for x in e], [x["val_loss"] for x in e], marker="o", label=name)
    for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def compare(paths: list[str | Path], out: str | Path | None = None) -> tuple[str, Path, Path]:
    """Compare the runs under ``paths`` (``find_runs``); write ``compare.md`` and ``compare.png`` into
    ``out`` (default: the one sweep directory given, else the runs' common parent). Returns the markdown
    table and the two files' paths.

    Raises:
        ValueError: a path that is no run or sweep directory.
    """
    runs = [load_run(d) for d in find_runs(paths)]
    settings = compared_settings(runs)
    table = markdown_table(runs, settings)
    if out is None:
        given = [Path(p) for p in paths]
        one_sweep = len(given) == 1 and not is_run_dir(given[0])
        out = given[0] if one_sweep else Path(os.path.commonpath([str(r["dir"].resolve().parent) for r in runs]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "compare.md", out / "compare.png"
    md.write_text(f"# Comparison of {len(runs)} runs\n\n{table}\n![loss curves](compare.png)\n")
    plot(runs, settings, png)
    return table, md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or a sweep directory")
    parser.add_argument("--out", default=None, help="where compare.md and compare.png go")
    args = parser.parse_args(argv)
    try:
        table, md, png = compare(args.runs, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
