"""Helpers for the end-to-end training tests: run ``python -m train`` (or torchrun) in a subprocess."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A model and data small enough for a 2-core CPU: 2 layers, 4 query / 2 KV heads, 256-token samples.
SMALL = [
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "data.vocab_size=1024", "data.seq_len=256", "moba.block_size=32", "moba.top_k=3",
    "train.micro_batch_size=2", "train.eval_batches=1", "optim.warmup_steps=2", "logging.wandb.mode=disabled",
    "checkpoint.export_hf=false",
]


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_ops():
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (about a minute on 2 cores) the
    first time a process initialises ``deepspeed.comm``. Build it once, here, into a directory owned by
    this virtual environment (not the user-wide ``~/.cache/torch_extensions``, where another checkout's
    interrupted build leaves a ``lock`` file that makes every later build wait forever). A lock older
    than ten minutes is such a leftover and is removed."""
    ext_dir = Path(sys.prefix) / "torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    for lock in ext_dir.glob("*/lock"):
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env, check=True, capture_output=True, timeout=900)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data cache (tokenizer, packed shards) shared by every training test of the session."""
    return tmp_path_factory.mktemp("moba_cache")


def run_train(args, run_dir, cache, nproc=1, check=True, timeout=300):
    env = {**os.environ, "MOBA_CACHE": str(cache), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "train"]
    else:
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(nproc))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "train"]
    cmd += [*SMALL, f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


WORDS = "alpha beta gamma delta import return class lambda yield async await def self none".split()
# Words per document: training documents of unequal lengths (about 50 to 220 tokens), and two longer
# ones whose names hash into the validation split (data.corpus.split_indices), so that two data-parallel
# ranks each get a validation sample under data.packing=pad.
DOC_WORDS = {**{f"doc{i:02d}.txt": n for i, n in enumerate([25, 80, 45, 60, 90, 30, 70, 50, 85, 40, 20, 65])},
             "doc74.txt": 180, "doc115.txt": 150}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A directory of 14 short text documents of unequal lengths, with its own data cache already built
    (tokenizer trained): ``(corpus dir, cache dir, tokenizer)``. Runs use it with ``small_data_args``."""
    import random

    from data import build_data

    root = tmp_path_factory.mktemp("small_corpus")
    rng = random.Random(0)
    for name, n in DOC_WORDS.items():
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(n)) + "\n")
    cache = tmp_path_factory.mktemp("small_cache")
    _, tok = build_data(path=str(root), vocab_size=1024, seq_len=256, cache_dir=cache)
    val, _ = build_data(path=str(root), vocab_size=1024, seq_len=256, split="val", cache_dir=cache)
    assert val.meta["num_docs"] == 2
    return root, cache, tok


def small_data_args(small_corpus):
    """The overrides that train on ``small_corpus`` with its cache."""
    root, cache, _ = small_corpus
    return [f"data.path={root}", f"data.cache_dir={cache}"]


@pytest.fixture(scope="session")
def init_checkpoint(small_corpus, tmp_path_factory):
    """A freshly initialised tiny HF Llama (2 layers, 4/2 heads, rope_theta 500000) saved with the
    small corpus's tokenizer, as ``model.name_or_path`` of a run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = small_corpus[2]
    out = tmp_path_factory.mktemp("init_ckpt")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=500000.0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save(out)
    return out
