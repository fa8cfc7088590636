"""GPU: time one torch AdamW step per ``optim.implementation`` on a model's parameter shapes (fp32, as the
master copy DeepSpeed's bf16 optimizer steps), with gradient clipping:

    python launch/optimizer_bench.py [--model llama_1b] [--steps 10] [--zero-stages 0,1]

Prints the median ms of ``clip_grad_norm_`` + ``step()`` per implementation (``train.bench_kernels.timed_many``:
A B B A blocks of back-to-back steps, each after warm-up steps; ``--steps`` is its ``reps``) and the parameter
count. ``--zero-stages`` also times ``engine.step()`` of DeepSpeed's bf16 engine at those ZeRO stages (one
process, one GPU; the wrapper DeepSpeed picks is printed: at stage 0 it keeps per-parameter fp32 copies, at
stage 1 flat buffers), as ``python -m train`` configures it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.bench_kernels import timed_many  # noqa: E402
from train.distributed import shutdown_distributed  # noqa: E402
from train.loop import adamw_options, adamw_param_groups  # noqa: E402

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
    ap.add_argument("--zero-stages", default="", help="also DeepSpeed's bf16 engine.step() at these stages, e.g. 0,1")
    args = ap.parse_args(argv)
    from train.config import ADAMW_IMPLEMENTATIONS

    bad = [i for i in args.implementations.split(",") if i not in ADAMW_IMPLEMENTATIONS]
    if bad:
        ap.error(f"--implementations {args.implementations!r}: {bad[0]!r} is not one of "
                 f"{', '.join(ADAMW_IMPLEMENTATIONS)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (it times GPU optimizer steps)")
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
        opt = torch.optim.AdamW(adamw_param_groups(params, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                **adamw_options(impl, dev, False))
        setups[impl] = (params, opt)

    def step(impl):
        params, opt = setups[impl]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    ms = timed_many({impl: (lambda impl=impl: step(impl)) for impl in impls}, args.steps)  # A B B A blocks
    for impl in impls:
        med, base = ms[impl], ms[impls[0]]
        print(f"optim.implementation={impl:9s} clip + step {med:8.2f} ms  ({med / base:.2f}x {impls[0]})")
    setups.clear()
    torch.cuda.empty_cache()
    for stage in [int(x) for x in args.zero_stages.split(",") if x]:
        for impl in impls:
            wrapper, med = engine_step_ms(shapes, impl, stage, args.steps)
            print(f"DeepSpeed bf16 ZeRO {stage} ({wrapper}), optim.implementation={impl:9s} engine.step {med:8.2f} ms")
    return 0


def engine_step_ms(shapes: list[tuple[int, ...]], implementation: str, stage: int, steps: int) -> tuple[str, float]:
    """(DeepSpeed's optimizer wrapper, median ms of ``engine.step()``) of a bf16 engine over parameters of
    ``shapes``, after a backward of a loss that reaches every parameter; the DeepSpeed settings of
    ``train.loop.deepspeed_config`` that matter here (gradient clipping 1.0, bf16, the ZeRO stage)."""
    import os

    import deepspeed

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl")

    class Params(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes])

        def forward(self):
            return sum((p.float() * 1e-3).sum() for p in self.ps)

    model = Params().cuda()
    opt = torch.optim.AdamW(adamw_param_groups(model.parameters(), 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            **adamw_options(implementation, torch.device("cuda"), False))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    times = []
    for i in range(3 + steps):
        engine.backward(engine())
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine.step()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    wrapper = type(engine.optimizer).__name__
    del engine, model, opt
    torch.cuda.empty_cache()
    return wrapper, statistics.median(times)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutdown_distributed()
