"""Checkpoints: DeepSpeed engine state plus the loop's own state, saved so a killed run loses nothing.

Layout under the checkpoint dir (``checkpoint.dir``, default ``<run dir>/checkpoints``):
    step_00000050/            one DeepSpeed tag: model, optimizer (ZeRO-partitioned), LR scheduler,
        rng_rank<r>.pt        and this rank's RNG states (every rank's own, not only rank 0's)
    latest                    the newest complete tag, written by DeepSpeed after the tag is saved

A run killed while saving leaves ``latest`` pointing at the previous complete tag. Older tags are
removed only after a new one is complete (``checkpoint.keep``).
"""

from __future__ import annotations

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


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete-looking tags in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (None when there is no complete checkpoint)."""
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, rank: int) -> Path:
    """Save a checkpoint at ``step`` (collective: every rank calls it), then prune old tags on rank 0."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")  # atomic: the new tag counts only once it is complete
        if keep > 0:
            for old in list_tags(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    log.info("saved checkpoint %s", ckpt_dir / tag)
    return ckpt_dir / tag


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``resume=auto`` (latest in ``ckpt_dir``, or None), ``none``, or a path to
    a checkpoint dir (its ``latest``) or a tag dir inside one.

    Raises:
        ValueError: ``resume`` is a path without a checkpoint.
    """
    if resume == "none":
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
