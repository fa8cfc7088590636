"""The loss of an optimizer step is the mean over all valid tokens of the step, whatever its split into
micro-batches, gradient accumulation, data-parallel and sequence-parallel ranks: the logged loss and the
gradient norm of step 1 equal an independent computation on the same two samples."""

import math

import pytest
import torch
import torch.nn.functional as F

from data import ResumableSampler, build_data

from .conftest import read_metrics, run_train, small_data_args


@pytest.fixture(scope="module")
def expected_step1(small_corpus, init_checkpoint):
    """Token-mean loss and its gradient norm over the first two samples of the (seed 1234) training order,
    computed with the plain transformers model, one forward per sample (``data.packing=pad``: each
    sample is one document followed by padding, so causal attention over the row is exact)."""
    from transformers import AutoModelForCausalLM

    root, cache, _ = small_corpus
    ds, _ = build_data(path=str(root), vocab_size=1024, seq_len=256, packing="pad", cache_dir=cache)
    first_two = ResumableSampler(len(ds), seed=1234).epoch_indices(0)[:2]
    model = AutoModelForCausalLM.from_pretrained(init_checkpoint, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    sums, counts, grads = [], [], []
    for i in first_two:
        s = ds[int(i)]
        logits = model(s["input_ids"][None]).logits[0]
        loss_sum = F.cross_entropy(logits, s["labels"], ignore_index=-100, reduction="sum")
        grads.append(torch.autograd.grad(loss_sum, params))
        sums.append(float(loss_sum.detach()))
        counts.append(int((s["labels"] != -100).sum()))

    def norm(weights):
        return math.sqrt(sum(float(sum(w * g[j] for w, g in zip(weights, grads)).double().pow(2).sum())
                             for j in range(len(params))))

    n = sum(counts)
    grad_norm = norm([1 / n, 1 / n])
    # The samples differ in length, so weighting each micro-batch equally would give another gradient.
    assert counts[0] != counts[1] and abs(norm([0.5 / counts[0], 0.5 / counts[1]]) - grad_norm) > 1e-3 * grad_norm
    return sum(sums) / n, grad_norm


@pytest.mark.parametrize(
    "split,nproc",
    [
        pytest.param(["train.micro_batch_size=2", "train.grad_accum=1"], 1, id="mb2"),
        pytest.param(["train.micro_batch_size=1", "train.grad_accum=2"], 1, id="mb1-ga2"),
        pytest.param(["train.micro_batch_size=1", "train.grad_accum=1"], 2, id="dp2"),
        pytest.param(["train.micro_batch_size=1", "train.grad_accum=2", "parallel.sp_size=2"], 2, id="sp2-ga2"),
    ],
)
def test_step_loss_and_grad_norm_are_token_means(tmp_path, small_corpus, init_checkpoint, expected_step1, split,
                                                 nproc):
    run_dir = tmp_path / "run"
    run_train([*small_data_args(small_corpus), f"model.name_or_path={init_checkpoint}", "data.packing=pad",
               "schedule=full", "train.max_steps=1", "optim.warmup_steps=0", *split], run_dir, small_corpus[1],
              nproc=nproc)
    (m,) = read_metrics(run_dir)
    loss, grad_norm = expected_step1
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
