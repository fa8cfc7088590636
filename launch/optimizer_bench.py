"""GPU: time one torch AdamW step per ``optim.implementation`` on a model's parameter shapes (fp32, as the
master copy DeepSpeed's bf16 optimizer steps), with gradient clipping as DeepSpeed does it:

    python launch/optimizer_bench.py [--model llama_1b] [--steps 10]

Prints the median ms of ``clip_grad_norm_`` + ``step()`` per implementation (timed in A B B A blocks, after
warm-up steps) and the parameter count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.loop import adamw_options  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parameter_shapes(model: str, vocab_size: int) -> list[tuple[int, ...]]:
    """Shapes of a Llama-style model's parameters from ``configs/model/<model>.yaml``."""
    m = yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text())
    h, f, hd = m["hidden_size"], m["intermediate_size"], m["hidden_size"] // m["num_heads"]
    kv = m["num_kv_heads"] * hd
    layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,)]
    shapes = [(vocab_size, h)] + layer * m["num_layers"] + [(h,)]
    if not m.get("tie_embeddings", False):
        shapes.append((vocab_size, h))
    return shapes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--implementations", default="foreach,fused")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    shapes = parameter_shapes(args.model, args.vocab_size)
    print(f"{args.model}: {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors")
    impls = args.implementations.split(",")
    setups = {}
    for impl in impls:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **adamw_options(impl, dev, False))
        setups[impl] = (params, opt)

    def step(impl):
        params, opt = setups[impl]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    times = {impl: [] for impl in impls}
    for impl in impls + impls[::-1]:  # A B B A
        for _ in range(3):
            step(impl)
        for _ in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(impl)
            b.record()
            torch.cuda.synchronize()
            times[impl].append(a.elapsed_time(b))
    base = statistics.median(times[impls[0]])
    for impl in impls:
        med = statistics.median(times[impl])
        print(f"optim.implementation={impl:9s} clip + step {med:8.2f} ms  ({med / base:.2f}x {impls[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
