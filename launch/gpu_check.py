"""Quick GPU check of every MoBA backend against the fp32 reference (bf16, GQA, packed); prints a table and
the first backend that passes, so a GPU session can pick it: python launch/gpu_check.py [--write FILE]."""

import sys

import torch

from moba_core import moba_attention, moba_attention_reference


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(backend):
    torch.manual_seed(0)
    lens = [1000, 37, 2059]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    T = sum(lens)
    # Inputs rounded to bf16 first, so the fp32 reference routes exactly as the bf16 run does (routing on
    # differently rounded inputs can pick other blocks near ties, which is not a kernel error).
    q, k, v = (torch.randn(T, h, 128, device="cuda").bfloat16().float() for h in (8, 2, 2))
    do = torch.randn(T, 8, 128, device="cuda")
    ins = [x.requires_grad_() for x in (q, k, v)]
    ref = moba_attention_reference(*ins, cu, max(lens), 128, 4)
    gref = torch.autograd.grad(ref, ins, do)
    low = [x.detach().bfloat16().requires_grad_() for x in ins]
    o = moba_attention(*low, cu, max(lens), 128, 4, backend=backend)
    g = torch.autograd.grad(o, low, do.bfloat16())
    return [rel(o, ref)] + [rel(a, b) for a, b in zip(g, gref)]


if __name__ == "__main__":
    chosen = None
    for backend in ("triton", "flash"):
        try:
            errs = check(backend)
            ok = max(errs) < 1e-2
            print(f"{backend:7s} rel err o/dq/dk/dv: " + " ".join(f"{e:.2e}" for e in errs), "OK" if ok else "FAIL")
            chosen = chosen or (backend if ok else None)
        except Exception as e:  # report and try the next backend
            print(f"{backend:7s} error: {type(e).__name__}: {str(e)[:300]}")
    print("chosen backend:", chosen)
    if "--write" in sys.argv and chosen:
        open(sys.argv[sys.argv.index("--write") + 1], "w").write(chosen)
