"""The NaN / inf guard: a step with a non-finite gradient or loss applies no update (and leaves the LR schedule
where it was), is logged as skipped, and more than ``train.max_skipped_steps`` of them in a row stop the run
with the last good checkpoint kept. Runs the loop in this process with NaN injected into chosen steps."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from train import loop
from train.__main__ import to_run_config
from train.distributed import _free_port
from train.guard import NonFiniteError
from train.model import PackedCausalLM

from .conftest import REPO, SMALL, read_metrics, small_data_args


class NaNGrad(torch.autograd.Function):
    """0 in forward (the loss stays finite), NaN gradient in backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.full_like(x, float("nan"))


def in_process_env(monkeypatch, cache):
    """The environment a single-process launch would have (restored after the test), on a free port (a fixed
    one, 29731, was once taken when the test ran: EADDRINUSE failed a CI run)."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "MOBA_CACHE": str(cache),
                 "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                  small_corpus):
    in_process_env(monkeypatch, small_corpus[1])
    nan_grad, nan_loss = {2}, {4, 5, 6}  # optimizer steps (1-based; grad_accum 1: one forward each)
    seen = []  # (step, a copy of one weight) at every training forward

    class Injected(PackedCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if not torch.is_grad_enabled():  # an evaluation
                return out
            step = len(seen) + 1
            w = self.lm.get_input_embeddings().weight
            seen.append((step, w.detach().clone()))
            loss, n = out
            if step in nan_grad:
                loss = loss + NaNGrad.apply(w)
            if step in nan_loss:
                loss = loss * float("nan")
            return loss, n

    monkeypatch.setattr(loop, "PackedCausalLM", Injected)
    overrides = [*SMALL, *small_data_args(small_corpus), "train.max_steps=8", "checkpoint.every=1",
                 "checkpoint.keep=0", "train.max_skipped_steps=2", "optim.warmup_steps=4", "optim.lr=1e-3",
                 "data.packing=pad", "device=cpu"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        loop.run(cfg, run_dir, {"model": {}})
    ckpt_dir = run_dir / "checkpoints"
    msg = str(err.value)
    assert "step 6: the loss or gradient norm was not finite in 3 steps in a row" in msg
    assert "train.max_skipped_steps=2" in msg and f"checkpoint is kept: {ckpt_dir / 'step_00000003'}" in msg

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [False, True, False, True, True, True]
    assert math.isnan(rows[3]["loss"]) and math.isfinite(rows[1]["loss"])  # step 2: only the gradient was NaN
    # LR: warmup (s + 1) / 4 of 1e-3 at the s-th update; a skipped step does not advance it.
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 5e-4, 7.5e-4, 7.5e-4, 7.5e-4])
    w = dict(seen)
    assert not torch.equal(w[1], w[2])  # step 1 updated the weights
    assert torch.equal(w[2], w[3])  # step 2 was skipped: step 3 saw the same weights
    assert not torch.equal(w[3], w[4])
    assert torch.equal(w[4], w[5]) and torch.equal(w[5], w[6])
    assert all(torch.isfinite(x).all() for x in w.values())
    # Checkpoints of the good steps only; latest is the last good one (step 3).
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_00000001", "step_00000003"]
    assert (ckpt_dir / "latest").read_text() == "step_00000003"
    saved = json.loads((ckpt_dir / "step_00000003" / "run_config.json").read_text())
    assert "data_identity" in saved


def test_max_skipped_steps_must_not_be_negative():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        with pytest.raises(ValueError, match=r"train.max_skipped_steps=-1 must be >= 0"):
            to_run_config(compose("config", overrides=["train.max_skipped_steps=-1"]))
