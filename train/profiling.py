"""One training step under ``torch.profiler``, its time split into the parts of a step (``train.profile_step``).

Usage: ``python -m train ... train.profile_step=5`` profiles optimizer step 5 (1-based) on every rank and
writes, into the run directory,

- ``profile/step<N>_rank<R>.json``: the Chrome / Perfetto trace of that rank (open in ui.perfetto.dev);
- ``profile_step<N>.json`` (rank 0): the split of the step's device time into ``CATEGORIES``, with the
  kernels that took the most time, and the step's wall time; the same table goes to the log.

The split sums the self time of every GPU kernel (CPU operators when the run has no GPU), each placed in a
category by its name (``category``). ``idle`` is the wall time of the step minus the summed kernel time
(host-bound gaps and synchronisation; negative when kernels of several streams overlap). Activation
checkpointing's recompute lands in the categories of the ops it re-runs (mostly ``matmul`` and
``attention``): a profile shows what the GPU did, not the model FLOPs that MFU counts.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# (category, pattern searched in the lower-cased kernel / operator name), first match wins. The order
# matters: "flash_fwd" is attention though it holds no "gemm", a Liger cross-entropy kernel is loss.
CATEGORY_RULES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|broadcast|c10d|gloo"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_sgd|lamb|clip_grad"),
    ("loss", r"cross_?entropy|nll_loss|log_softmax|logsumexp"),
    ("attention", r"flash|fmha|attention|sdpa|_list_fwd|_combine_fwd|_dkdv|_list_dq|_diag_dq|_delta_kernel"
                  r"|_gather_rows|_route_topk|_mean_pool|_list_pass|_list_scan|_tile_list|moba"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|aten::(mm|addmm|bmm|matmul|linear|baddbmm)\b|^void gemv"),
    ("norm_rope_act", r"rms_?norm|layer_?norm|rope|rotary|swiglu|silu|gelu|geglu"),
    ("copy", r"memcpy|memset|copy_|\bcat\b|catarraybatched|index_(select|put|copy|add)|gather|scatter|contiguous"),
)
CATEGORIES = ("attention", "matmul", "loss", "norm_rope_act", "optimizer", "communication", "copy", "other")


def summary_path(run_dir: Path, step: int) -> Path:
    """Where rank 0 writes the split of profiled step ``step``: ``<run_dir>/profile_step<step>.json``."""
    return Path(run_dir) / f"profile_step{step}.json"


def category(name: str) -> str:
    """The part of a training step a GPU kernel or CPU operator named ``name`` belongs to: one of
    ``CATEGORIES`` (``other`` when no rule of ``CATEGORY_RULES`` matches)."""
    low = name.lower()
    for cat, pattern in CATEGORY_RULES:
        if re.search(pattern, low):
            return cat
    return "other"


def split_events(events, on_device: bool) -> tuple[dict[str, float], list[tuple[str, float, str]]]:
    """Milliseconds per category and per name from profiler key averages.

    Args:
        events: ``prof.key_averages()`` (or rows with ``key``, ``self_device_time_total`` /
            ``self_cpu_time_total`` in microseconds, ``device_type``).
        on_device: sum GPU kernels (True) or CPU operators (False).
    Returns:
        ({category: ms} over ``CATEGORIES``, [(name, ms, category)] sorted by time, largest first).
    """
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for e in events:
        if on_device:
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
            if str(getattr(e, "device_type", "")).endswith("CPU"):
                continue  # the CPU-side record of an operator: its kernels are counted as device events
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        cat = category(e.key)
        per_cat[cat] += us / 1e3
        rows.append((e.key, us / 1e3, cat))
    rows.sort(key=lambda r: -r[1])
    return per_cat, rows


class StepProfiler:
    """Profiles one optimizer step: ``with StepProfiler(run_dir, step, rank, device):`` around the step.

    Args:
        run_dir: the run directory (``profile/`` and ``profile_step<N>.json`` go there).
        step: the 1-based optimizer step being profiled (names the files).
        rank: the global rank (one trace per rank; the summary from rank 0).
        device: the training device (CUDA kernels are profiled on a GPU, CPU operators otherwise).
    """

    def __init__(self, run_dir: Path, step: int, rank: int, device: torch.device):
        self.run_dir, self.step, self.rank, self.device = Path(run_dir), step, rank, device
        self.on_device = device.type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.on_device:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.summary: dict | None = None

    def __enter__(self):
        if self.on_device:
            torch.cuda.synchronize(self.device)
        self.prof.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.on_device:
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - self.t0) * 1e3
        self.prof.__exit__(*exc)
        if exc[0] is not None:
            return False
        trace = self.run_dir / "profile" / f"step{self.step}_rank{self.rank}.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(trace))
        per_cat, rows = split_events(self.prof.key_averages(), self.on_device)
        busy = sum(per_cat.values())
        self.summary = {
            "step": self.step, "rank": self.rank, "device": "cuda" if self.on_device else "cpu",
            "wall_ms": wall_ms, "busy_ms": busy, "idle_ms": wall_ms - busy,
            "categories_ms": per_cat, "share_of_busy": {c: (v / busy if busy else 0.0) for c, v in per_cat.items()},
            "top": [{"name": n[:160], "ms": ms, "category": c} for n, ms, c in rows[:25]],
            "trace": str(trace.relative_to(self.run_dir)),
        }
        if self.rank == 0:
            summary_path(self.run_dir, self.step).write_text(json.dumps(self.summary, indent=1) + "\n")
            log.info("profile of step %d (%s, wall %.1f ms, busy %.1f ms): %s; trace %s", self.step,
                     self.summary["device"], wall_ms, busy,
                     ", ".join(f"{c} {v:.1f} ms ({100 * v / busy if busy else 0:.0f}%)"
                               for c, v in per_cat.items() if v > 0), trace)
        return False
