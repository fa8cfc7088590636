"""An evaluation uses the attention of the step it evaluates: the step-0 evaluation of a ``schedule=full``
stage is the full-attention model's loss, not the MoBA one's."""

import json

import pytest
import torch
import torch.nn.functional as F

from data import build_data
from moba_core import MoBAConfig
from moba_core.hf import apply_moba

from .conftest import run_train, small_data_args


def val_loss(model, samples):
    """Token-mean loss of ``samples`` (pad packing: one document then padding per sample), one forward each."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(s["input_ids"][None]).logits[0]
            total += float(F.cross_entropy(logits, s["labels"], ignore_index=-100, reduction="sum"))
            count += int((s["labels"] != -100).sum())
    return total / count


def test_step0_eval_of_full_schedule_uses_full_attention(tmp_path, small_corpus, init_checkpoint):
    from transformers import AutoModelForCausalLM

    root, cache, _ = small_corpus
    ds, _ = build_data(path=str(root), vocab_size=1024, seq_len=256, packing="pad", split="val", cache_dir=cache)
    samples = [ds[0], ds[1]]  # one evaluation batch (train.micro_batch_size=2, eval_batches=1), in order
    model = AutoModelForCausalLM.from_pretrained(init_checkpoint, dtype=torch.float32).eval()
    full = val_loss(model, samples)
    apply_moba(model, MoBAConfig(block_size=32, top_k=1, backend="reference"))
    moba = val_loss(model, samples)
    assert abs(moba - full) > 1e-3  # MoBA (each query sees its own block of 32 keys) differs

    run_dir = tmp_path / "run"
    run_train([*small_data_args(small_corpus), f"model.name_or_path={init_checkpoint}", "data.packing=pad",
               "schedule=full", "moba.top_k=1", "train.max_steps=1"], run_dir, cache)
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0
    assert evals[0]["val_loss"] == pytest.approx(full, rel=1e-5)
