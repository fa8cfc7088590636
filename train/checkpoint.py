"""Checkpoints: DeepSpeed engine state plus the loop's own state, saved so a killed run loses nothing.

Layout under the checkpoint dir (``checkpoint.dir``, default ``<run dir>/checkpoints``):
    step_00000050/            one DeepSpeed tag: model, optimizer (ZeRO-partitioned), LR scheduler,
        rng_rank<r>.pt        and this rank's RNG states (every rank's own, not only rank 0's)
    latest                    the newest complete tag, written by DeepSpeed after the tag is saved

A run killed while saving leaves ``latest`` pointing at the previous complete tag. Older tags are
removed only after a new one is complete (``checkpoint.keep``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete-looking tags in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=step_of)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: the tag named by ``ckpt_dir/latest``, or, when that file is missing
    or names a folder that is gone, the newest tag whose rank-0 RNG file (written after the engine state)
    exists. None when there is none."""
    f = ckpt_dir / "latest"
    if f.is_file():
        tag = f.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    complete = [t for t in list_tags(ckpt_dir) if (ckpt_dir / t / "rng_rank0.pt").is_file()]
    if complete:
        log.warning("%s names no complete checkpoint; using the newest complete one, %s", f, complete[-1])
        return complete[-1]
    return None



def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, rank: int, run_config: dict) -> Path:
    """Save a checkpoint at ``step`` (collective: every rank calls it), then prune on rank 0: the new tag and
    the ``keep - 1`` newest earlier ones stay (tags of later steps, from another run, are never touched)."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / "run_config.json").write_text(json.dumps(run_config, indent=2))
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")  # atomic: the new tag counts only once it is complete
        if keep > 0:
            older = [t for t in list_tags(ckpt_dir) if step_of(t) < step]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        log.info("saved checkpoint %s", ckpt_dir / tag)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``resume=auto`` (latest in ``ckpt_dir``, or None), ``none``, or a path to
    a checkpoint dir (its ``latest``) or a tag dir inside one.

    Raises:
        ValueError: ``resume`` is a path without a checkpoint.
    """
    if resume == "none":
        if latest_tag(ckpt_dir):
            raise ValueError(
                f"resume=none but {ckpt_dir} already holds checkpoints (newest {latest_tag(ckpt_dir)}): use "
                "resume=auto to continue them, or another hydra.run.dir / checkpoint.dir to start fresh"
            )
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if (p / "latest").is_file() and latest_tag(p):
        return p, latest_tag(p)
    if p.is_dir() and TAG_RE.match(p.name):
        return p.parent, p.name
    raise ValueError(f"resume={resume!r} is neither auto, none, nor a checkpoint directory")


# Settings a resumed run must share with its checkpoint (the model's shape and the data order).
RESUME_KEYS = [
    "model.name_or_path", "model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.tie_embeddings", "data.path", "data.tokenizer", "data.vocab_size", "data.seq_len",
    "data.packing", "train.micro_batch_size", "seed", "world_size", "parallel.sp_size",
]


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def check_resume_compatible(ckpt_dir: Path, tag: str, run_config: dict) -> None:
    """Compare this run's settings with those saved beside the checkpoint (``run_config.json``).

    Raises:
        ValueError: naming every setting that differs, with both values.
    """
    f = ckpt_dir / tag / "run_config.json"
    if not f.is_file():
        return
    saved = json.loads(f.read_text())
    diff = [f"{k}={_get(saved, k)!r} there, {_get(run_config, k)!r} now" for k in RESUME_KEYS
            if _get(saved, k) != _get(run_config, k)]
    if diff:
        raise ValueError(
            f"cannot resume from {ckpt_dir / tag}: " + "; ".join(diff)
            + ". Use the same settings, or another hydra.run.dir (or resume=none there) to start fresh"
        )


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Load engine state, optimizer and scheduler included, and this rank's RNG; returns client state."""
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ValueError(f"could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state or {}
