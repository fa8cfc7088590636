"""``optim.implementation``: which torch AdamW kernels a run uses, and that the choice changes nothing but speed."""

import pytest
import torch

from train.loop import adamw_kernels, adamw_options, bf16_grad_accum_warning, follow_optim_settings

from .conftest import read_metrics, run_train


@pytest.mark.parametrize("implementation,device,offload,expected", [
    ("auto", "cuda", False, {"fused": True}),
    ("auto", "cuda", True, {}),  # states in CPU memory: torch's default there
    ("auto", "cpu", False, {}),
    ("fused", "cpu", False, {"fused": True}),
    ("foreach", "cuda", False, {"foreach": True}),
    ("for-loop", "cuda", False, {"foreach": False}),
])
def test_adamw_options(implementation, device, offload, expected):
    assert adamw_options(implementation, torch.device(device), offload) == expected


def test_unknown_implementation_names_the_setting():
    with pytest.raises(ValueError, match="optim.implementation='apex' must be one of auto, fused, foreach, for-loop"):
        adamw_options("apex", torch.device("cpu"), False)


def test_fused_adamw_steps_like_the_for_loop_one():
    """Two identical models, one AdamW step each with weight decay from the same gradients: the fused kernels
    (CPU) give the same parameters and states as the one-parameter-at-a-time loop, to fp32 rounding."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(32, 16)
    fused = torch.nn.Linear(32, 16)
    fused.load_state_dict(ref.state_dict())
    start = [p.detach().clone() for p in ref.parameters()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **adamw_options(impl, torch.device("cpu"),
                                                                                         False))
            for m, impl in ((ref, "for-loop"), (fused, "fused"))]
    x = torch.randn(8, 32)
    for _ in range(3):
        for m, opt in zip((ref, fused), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(ref.parameters(), fused.parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - a0).abs().max() > 1e-3  # the steps moved the parameters
    sa, sb = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_a_loaded_state_follows_this_launchs_settings():
    """``Optimizer.load_state_dict`` restores the saved groups' flags and hyperparameters: a for-loop checkpoint
    loaded into a fused AdamW stays for-loop (and keeps the old betas) until ``follow_optim_settings``; after it,
    two more steps give what two more for-loop steps give, to fp32 rounding."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    x = torch.randn(8, 32)

    def model_and_opt(impl, betas=(0.9, 0.95)):
        torch.manual_seed(1)
        m = torch.nn.Linear(32, 16)
        decay, no_decay = [m.weight], [m.bias]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=betas, **adamw_options(impl, torch.device("cpu"), False))
        return m, opt

    def steps(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    straight, s_opt = model_and_opt("for-loop")
    steps(straight, s_opt, 4)
    first, f_opt = model_and_opt("for-loop")
    steps(first, f_opt, 2)
    resumed, r_opt = model_and_opt("fused", betas=(0.8, 0.9))
    resumed.load_state_dict(first.state_dict())
    r_opt.load_state_dict(f_opt.state_dict())
    assert r_opt.param_groups[0]["fused"] is None and r_opt.param_groups[0]["foreach"] is False
    assert r_opt.param_groups[0]["betas"] == (0.9, 0.95)  # the checkpoint's
    o = SimpleNamespace(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    follow_optim_settings(r_opt, o, adamw_options("fused", torch.device("cpu"), False))
    assert [g["fused"] for g in r_opt.param_groups] == [True, True] and adamw_kernels(r_opt) == "fused=True"
    assert [g["weight_decay"] for g in r_opt.param_groups] == [0.1, 0.0]
    steps(resumed, r_opt, 2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    o.beta1 = 0.5  # a changed setting applies
    follow_optim_settings(r_opt, o, adamw_options("for-loop", torch.device("cpu"), False))
    assert r_opt.param_groups[1]["betas"] == (0.5, 0.95) and adamw_kernels(r_opt) == "foreach=False"


def test_resume_with_another_implementation_continues_the_run(tmp_path, data_cache):
    """4 steps with the for-loop AdamW straight, against 2 steps of it and a resume to 4 with the fused one: the
    optimizer states load into the other implementation and the losses match (a checkpoint x override case);
    the log names the implementation in use."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop = "optim.implementation=for-loop"
    run_train(["train.max_steps=4", "checkpoint.every=2", loop], straight, data_cache)
    run_train(["train.max_steps=2", "checkpoint.every=2", loop], split, data_cache)
    proc = run_train(["train.max_steps=4", "checkpoint.every=2", "resume=auto", "optim.implementation=fused"], split,
                     data_cache)
    out = proc.stderr + proc.stdout
    assert "optim.implementation=fused (fused=True)" in out and "at step 2" in out
    a, b = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5, abs=1e-6)
    assert a[3]["loss"] != pytest.approx(a[1]["loss"], rel=1e-3)  # the steps after the resume trained


def test_bf16_grad_accum_warning_names_the_settings_only_where_bf16_sums_happen():
    """A GPU run (bf16) with several micro-batches per step gets the warning, naming train.grad_accum and the ZeRO
    stage; one micro-batch per step, or a CPU run (fp32), gets none."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    msg = bf16_grad_accum_warning(cuda, 4, 2)
    assert "train.grad_accum=4" in msg and "ZeRO stage 2" in msg and "bf16" in msg
    assert bf16_grad_accum_warning(cuda, 1, 0) is None
    assert bf16_grad_accum_warning(cpu, 8, 0) is None
